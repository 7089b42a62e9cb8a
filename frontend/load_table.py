"""The frontend processes' in-flight counts, shared through memory.

Several frontend processes share the port (`frontend.workers` > 1) and the load-reading
routers (kv, least_loaded) need the others' in-flight requests and prompt blocks per worker.
Published over NATS (`frontend.load_share`) they arrived a few milliseconds late, so requests
arriving together were each routed on a view without the others (benchmarks/README.md, "One
rotation across frontend processes": kv at 7 processes put 4-10 requests of a burst of 16
beyond the even share, one process none). All processes of a deployment run on one node (the
head: `contract.plan.frontend_plan` is its only source), so they share one file in /dev/shm
(`LOAD_TABLE_ENV`, named like the round-robin counter and removed with it at the stop):

- one row per process (its `HPCSERVE_FRONTEND_PROCESS` index), one column per worker; a cell
  holds the row's requests and prompt blocks on that worker (two arrays of 4-byte ints,
  column-major so a column's rows are one slice). Only a row's process writes it: at each
  started/finished (a prefill changes neither count), plain aligned stores, no lock;
- readers sum a column's other rows when the router asks (`peer_requests` / `peer_blocks` of
  `LoadTracker`, read lazily): what another process routed a microsecond ago counts;
- worker id -> column: a name table appended under an exclusive `flock` and read under a
  shared one, only when a process meets a worker it has no column for (workers join rarely;
  a hash would need collision handling and a reader could not tell two workers apart). A
  column is never reused: `COLUMNS` names in all, then `TableFull` (the worker's counts stay
  in its process, said once);
- the KV router's turns: one 8-byte cell per column, the monotonic time (one clock for every
  process of the node) any process last routed to that worker, so "the least recently routed"
  means across the deployment (`SharedTurns`); last writer wins, no lock;
- a crashed process: its row holds its pid; rows whose process is gone (checked every
  `LIVENESS_S`) are left out of the sums, and the restarted process (same index) clears its
  row before it routes. A stopping one clears its row and pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from contract.plan import LOAD_TABLE_ENV
from frontend.shared_memory import map_shared_file

if TYPE_CHECKING:
    from frontend.load_share import LoadShare
    from frontend.router import LoadTracker

logger = logging.getLogger(__name__)

MAGIC = 0x544C5048  # "HPLT"
VERSION = 2
ROWS = 64  # the most frontend processes (`frontend.workers` <= 64)
COLUMNS = 1024  # the most distinct worker ids over a deployment's life
NAME_BYTES = 128  # a column's name slot: its length (1 byte), then the UTF-8 worker id
LIVENESS_S = 1.0  # how often rows of gone processes are looked for

_HEADER = 64  # magic, version, rows, columns, name bytes, columns named: 4-byte ints
_NAMED = 5  # the header's count of named columns
_PIDS = _HEADER
_NAMES = _PIDS + 4 * ROWS
_REQUESTS = _NAMES + COLUMNS * NAME_BYTES
_BLOCKS = _REQUESTS + 4 * COLUMNS * ROWS
_TURNS = _BLOCKS + 4 * COLUMNS * ROWS
SIZE = _TURNS + 8 * COLUMNS  # 648 KiB, allocated by tmpfs as it is written


class TableFull(ValueError):
    """Every column is named: a new worker's counts cannot be shared."""


class LoadTable:
    """One process's mapping of the deployment's load table; `row`: its own."""

    def __init__(self, path: str, row: int, rows_used: int) -> None:
        if not 0 <= row < rows_used <= ROWS:
            raise ValueError(f"{LOAD_TABLE_ENV}: row {row} of {rows_used}: at most {ROWS} rows")
        self.path = path
        self.row = row
        self.rows_used = rows_used
        self._fd, self._map = map_shared_file(path, SIZE)
        try:
            with self._locked(fcntl.LOCK_EX):
                header = memoryview(self._map)[:_HEADER].cast("I")
                expected = (MAGIC, VERSION, ROWS, COLUMNS, NAME_BYTES)
                if header[0] == 0:  # the first to map it: magic last, once the rest is there
                    for position, value in enumerate(expected[1:], start=1):
                        header[position] = value
                    header[0] = MAGIC
                elif tuple(header[:5]) != expected:
                    header.release()
                    raise OSError(f"{path}: not a load table of this version")
        except BaseException:
            self._map.close()
            os.close(self._fd)
            raise
        self._header = header
        view = memoryview(self._map)
        self._pids = view[_PIDS:_NAMES].cast("I")
        self._names = view[_NAMES:_REQUESTS]
        self._requests = view[_REQUESTS:_BLOCKS].cast("i")
        self._blocks = view[_BLOCKS:_TURNS].cast("i")
        self._turns = view[_TURNS:SIZE].cast("q")
        self._columns: dict[str, int] = {}  # worker id -> column, as far as we read the names
        self._dead: list[int] = []  # other rows whose process is gone: left out of the sums

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fcntl.flock(self._fd, how)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ----- our row ----------------------------------------------------------------------
    def claim(self, pid: int | None = None) -> None:
        """Make our row ours: what a crashed predecessor of this index left goes."""
        self._pids[self.row] = 0
        self.clear()
        self._pids[self.row] = os.getpid() if pid is None else pid

    def release(self) -> None:
        """A clean stop: our counts go, and so does our pid."""
        self.clear()
        self._pids[self.row] = 0

    def clear(self) -> None:
        named = min(self._header[_NAMED], COLUMNS)
        for column in range(named):
            cell = column * ROWS + self.row
            self._requests[cell] = 0
            self._blocks[cell] = 0

    def write(self, worker_id: str, requests: int, blocks: int) -> None:
        """Our row's counts on `worker_id` (TableFull: no column is left for it)."""
        cell = self.column_for(worker_id) * ROWS + self.row
        self._requests[cell] = requests
        self._blocks[cell] = blocks

    # ----- the others' rows -------------------------------------------------------------
    def peer_requests(self, worker_id: str) -> int:
        """The other live processes' in-flight requests on `worker_id`."""
        return self._peer_sum(self._requests, worker_id)

    def peer_blocks(self, worker_id: str) -> int:
        """The other live processes' routed prompt blocks on `worker_id`."""
        return self._peer_sum(self._blocks, worker_id)

    def _peer_sum(self, cells: memoryview, worker_id: str) -> int:
        column = self._columns.get(worker_id)
        if column is None:
            column = self._find(worker_id)
            if column is None:  # no process counted anything there yet
                return 0
        base = column * ROWS
        total = sum(cells[base : base + self.rows_used]) - cells[base + self.row]
        for row in self._dead:
            total -= cells[base + row]
        return total

    # ----- the KV router's turns (one cell per worker, shared by every row) ------------------
    def mark_turn(self, worker_id: str, stamp: int) -> None:
        """Some process routed to `worker_id` at `stamp` (TableFull: no column is left)."""
        self._turns[self.column_for(worker_id)] = stamp

    def turn_of(self, worker_id: str) -> int | None:
        """When any process last routed to `worker_id` (None: none yet)."""
        column = self._columns.get(worker_id)
        if column is None:
            column = self._find(worker_id)
            if column is None:
                return None
        return self._turns[column] or None

    def named_workers(self) -> list[str]:
        """Every worker id with a column (in column order)."""
        self._sync_names()
        return sorted(self._columns, key=self._columns.__getitem__)

    def check_rows(self, alive: Callable[[int], bool] | None = None) -> list[int]:
        """Which other rows belong to a process that is gone (kept for the sums); a row
        without a pid is empty (never used, or cleared at a stop)."""
        alive = alive or process_alive
        dead = []
        for row in range(self.rows_used):
            pid = self._pids[row]
            if row != self.row and pid and not alive(pid):
                dead.append(row)
        if dead != self._dead:
            logger.info("frontend load table rows of gone processes: %s (left out)", dead)
        self._dead = dead
        return dead

    # ----- columns ----------------------------------------------------------------------
    def column_for(self, worker_id: str) -> int:
        """`worker_id`'s column, named now if no process has named it yet."""
        column = self._columns.get(worker_id)
        if column is not None:
            return column
        column = self._find(worker_id)
        if column is not None:
            return column
        encoded = worker_id.encode()
        if len(encoded) >= NAME_BYTES:
            raise TableFull(f"worker id {worker_id!r} is longer than {NAME_BYTES - 1} bytes")
        with self._locked(fcntl.LOCK_EX):
            self._read_names()
            column = self._columns.get(worker_id)
            if column is not None:  # named meanwhile by another process
                return column
            column = self._header[_NAMED]
            if column >= COLUMNS:
                raise TableFull(
                    f"{self.path}: all {COLUMNS} worker columns are named; worker "
                    f"{worker_id!r}'s load is not shared with the other frontend processes"
                )
            slot = column * NAME_BYTES
            self._names[slot + 1 : slot + 1 + len(encoded)] = encoded
            self._names[slot] = len(encoded)
            self._header[_NAMED] = column + 1
            self._columns[worker_id] = column
        return column

    def _find(self, worker_id: str) -> int | None:
        """The column another process named for `worker_id` since we last looked."""
        if self._header[_NAMED] == len(self._columns):  # nothing new: one read
            return None
        self._sync_names()
        return self._columns.get(worker_id)

    def _sync_names(self) -> None:
        with self._locked(fcntl.LOCK_SH):
            self._read_names()

    def _read_names(self) -> None:
        """Under the lock: the names appended since we last read (names are append-only)."""
        names = self._names
        for column in range(len(self._columns), min(self._header[_NAMED], COLUMNS)):
            slot = column * NAME_BYTES
            length = names[slot]
            self._columns[bytes(names[slot + 1 : slot + 1 + length]).decode()] = column

    def close(self) -> None:
        views = (self._header, self._pids, self._names, self._requests, self._blocks,
                 self._turns)  # fmt: skip
        for view in views:
            view.release()
        self._map.close()
        os.close(self._fd)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it exited and waits for its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class PeerCounts(Mapping[str, int]):
    """A `LoadTracker` view of the other processes' counts, read from the table when asked
    (`get` on the request path; iteration for tests and /health)."""

    def __init__(self, table: LoadTable, read: Callable[[str], int]) -> None:
        self._table = table
        self._read = read

    def get(self, worker_id: str, default: int = 0) -> int:  # type: ignore[override]
        """The other processes' count on `worker_id` (0, not `default`, when none)."""
        return self._read(worker_id)

    def __getitem__(self, worker_id: str) -> int:
        value = self._read(worker_id)
        if not value:
            raise KeyError(worker_id)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter([w for w in self._table.named_workers() if self._read(w)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SharedTurns:
    """The KV router's record of when each worker was last routed to, kept in the table so
    that its turns are the deployment's, not one process's: each process saw only its own
    choices, so requests arriving together in several processes all went to the worker each
    thought least recently used (benchmarks/README.md, "Shared turns")."""

    def __init__(self, table: LoadTable) -> None:
        self._table = table
        self._unshared: dict[str, int] = {}  # workers without a column: this process's view

    @staticmethod
    def stamp() -> int:
        """A turn's time: CLOCK_MONOTONIC, one clock for every process of the node."""
        return time.monotonic_ns()

    def get(self, worker_id: str, default: int = -1) -> int:
        turn = self._table.turn_of(worker_id)
        return turn if turn is not None else self._unshared.get(worker_id, default)

    def __setitem__(self, worker_id: str, stamp: int) -> None:
        try:
            self._table.mark_turn(worker_id, stamp)
        except TableFull:  # said by the load share's writes; turns stay in this process
            self._unshared[worker_id] = stamp


class TableLoadShare:
    """Keeps this process's row of the table current from the tracker, and points the
    tracker's peer counts at the table's other rows."""

    def __init__(
        self,
        table: LoadTable,
        tracker: LoadTracker,
        blocks_of: Callable[[str], int] | None = None,
    ) -> None:
        self.table = table
        self._tracker = tracker
        self._blocks_of = blocks_of
        self._unshared: set[str] = set()  # workers left without a column (said once each)
        self._liveness: asyncio.Task[None] | None = None

    def attach(self) -> None:
        """Claim our row and route by the table (the synchronous part of `start`)."""
        table, tracker = self.table, self._tracker
        table.claim()
        for worker_id in list(tracker.in_flight):
            self.changed(worker_id)
        table.check_rows()
        tracker.peer_requests = PeerCounts(table, table.peer_requests)
        tracker.peer_blocks = PeerCounts(table, table.peer_blocks)
        tracker.on_change = self.changed

    async def start(self) -> None:
        self.attach()
        self._liveness = asyncio.get_running_loop().create_task(self._check_forever())

    async def stop(self) -> None:
        self._tracker.on_change = None
        if self._liveness is not None:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
        self.table.release()
        self.table.close()

    def changed(self, worker_id: str) -> None:
        """LoadTracker hook: write our counts on `worker_id` to our row."""
        requests = self._tracker.in_flight.get(worker_id, 0)
        blocks = self._blocks_of(worker_id) if self._blocks_of is not None else 0
        try:
            self.table.write(worker_id, requests, blocks)
        except TableFull as exc:
            if worker_id not in self._unshared:
                self._unshared.add(worker_id)
                logger.error("%s", exc)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_S)
            self.table.check_rows()


def process_load_share(
    environ: Mapping[str, str],
    index: int,
    count: int,
    tracker: LoadTracker,
    blocks_of: Callable[[str], int] | None,
    nats_fallback: Callable[[], LoadShare],
) -> TableLoadShare | LoadShare:
    """How this process shares its counts with the deployment's other frontend processes:
    the table the plan names, or (with a warning) NATS when it is unset or cannot be mapped
    (e.g. no /dev/shm in a container)."""
    path = environ.get(LOAD_TABLE_ENV, "")
    if not path:
        logger.warning("%s is unset: the %d frontend processes share their load over NATS "
                       "(a few ms late)", LOAD_TABLE_ENV, count)  # fmt: skip
        return nats_fallback()
    try:
        table = LoadTable(path, index, count)
    except (OSError, ValueError) as exc:
        logger.warning("%s=%s: cannot map the shared load table (%s); the frontend processes "
                       "share their load over NATS (a few ms late)", LOAD_TABLE_ENV, path,
                       exc)  # fmt: skip
        return nats_fallback()
    return TableLoadShare(table, tracker, blocks_of)

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
- readers sum a column's other rows when the router asks (`peer_requests` of `LoadTracker`,
  read lazily; `peer_blocks`: the largest other row, see `LoadTable.peer_blocks`): what
  another process routed a microsecond ago counts;
- worker id -> column: a name table appended under an exclusive `flock` and read under a
  shared one, only when a process meets a worker it has no column for (workers join rarely;
  a hash would need collision handling and a reader could not tell two workers apart). A
  column is never reused: `COLUMNS` names in all, then `TableFull` (the worker's counts stay
  in its process, said once);
- the KV router's turns: one 8-byte cell per column, the monotonic time (one clock for every
  process of the node) any process last routed to that worker, so "the least recently routed"
  means across the deployment (`SharedTurns`); last writer wins, no lock;
- the KV router's pending prefill (`SharedRouting`): a third row-per-process array, the
  prompt blocks each process routed to a worker that have not sent a first output yet, and
  one 8-byte cell per column, when the worker started on its current prefill (any process's
  first output there, or a prompt routed to it with nothing pending anywhere): each process
  saw only its own, so a worker busy with another process's prompts looked idle;
- the KV router's recently routed prompts (`SharedRouting`): a small hash table per row
  (`PREFIX_SLOTS` entries of block hash, column, count of our in-flight requests holding it),
  written only by its process at each route and finish, holding a sample of each in-flight
  prompt's chained block hashes (`prefix_positions`); readers find, in each other live row,
  how deep a new prompt's prefix was routed to which worker, before that worker's KV events
  say so (a system prompt's second request in another process went elsewhere and computed
  it again: at 7 processes small_cache's hit rate fell from 0.98 to 0.63 of the oracle's);
- a crashed process: its row holds its pid; rows whose process is gone (checked every
  `LIVENESS_S`) are left out of the sums, and the restarted process (same index) clears its
  row before it routes. A stopping one clears its row and pid.
"""

from __future__ import annotations

import asyncio
import bisect
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
VERSION = 3
ROWS = 64  # the most frontend processes (`frontend.workers` <= 64)
COLUMNS = 1024  # the most distinct worker ids over a deployment's life
NAME_BYTES = 128  # a column's name slot: its length (1 byte), then the UTF-8 worker id
LIVENESS_S = 1.0  # how often rows of gone processes are looked for
PREFIX_SLOTS = 4096  # a row's routed-prefix entries (a power of two): ~18 per in-flight prompt
PREFIX_PROBES = 4  # slots an entry may sit in past its home slot's (linear probing)
PREFIX_STRIDE = 16  # sampled block positions: 0, 1, 3, 7, then every 16th, and the last

_HEADER = 64  # magic, version, rows, columns, name bytes, columns named: 4-byte ints
_NAMED = 5  # the header's count of named columns
_PIDS = _HEADER
_NAMES = _PIDS + 4 * ROWS
_REQUESTS = _NAMES + COLUMNS * NAME_BYTES
_BLOCKS = _REQUESTS + 4 * COLUMNS * ROWS
_TURNS = _BLOCKS + 4 * COLUMNS * ROWS
_PENDING = _TURNS + 8 * COLUMNS
_STARTS = _PENDING + 4 * COLUMNS * ROWS
_PREFIX_KEYS = _STARTS + 8 * COLUMNS
_PREFIX_COLUMNS = _PREFIX_KEYS + 8 * ROWS * PREFIX_SLOTS
_PREFIX_COUNTS = _PREFIX_COLUMNS + 4 * ROWS * PREFIX_SLOTS
SIZE = _PREFIX_COUNTS + 4 * ROWS * PREFIX_SLOTS  # 5 MiB, allocated by tmpfs as written


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
        self._turns = view[_TURNS:_PENDING].cast("q")
        self._pending = view[_PENDING:_STARTS].cast("i")
        self._starts = view[_STARTS:_PREFIX_KEYS].cast("d")
        self._prefix_keys = view[_PREFIX_KEYS:_PREFIX_COLUMNS].cast("Q")
        self._prefix_columns = view[_PREFIX_COLUMNS:_PREFIX_COUNTS].cast("i")
        self._prefix_counts = view[_PREFIX_COUNTS:SIZE].cast("i")
        self._columns: dict[str, int] = {}  # worker id -> column, as far as we read the names
        self._names_by_column: list[str] = []  # the same, column -> worker id
        self._dead: list[int] = []  # other rows whose process is gone: left out of the sums
        self._peer_rows = [r for r in range(rows_used) if r != row]  # the live other rows
        # our row's prefix entries: (block hash, column) -> slot (only we write our row)
        self._our_prefixes: dict[tuple[int, int], int] = {}

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
            self._pending[cell] = 0
        base = self.row * PREFIX_SLOTS
        self._prefix_counts[base : base + PREFIX_SLOTS] = _NO_COUNTS
        self._our_prefixes.clear()

    def write(self, worker_id: str, requests: int, blocks: int) -> None:
        """Our row's counts on `worker_id` (TableFull: no column is left for it)."""
        cell = self.column_for(worker_id) * ROWS + self.row
        self._requests[cell] = requests
        self._blocks[cell] = blocks

    def write_pending(self, worker_id: str, blocks: int) -> None:
        """Our row's pending prefill blocks on `worker_id` (TableFull: no column is left)."""
        self._pending[self.column_for(worker_id) * ROWS + self.row] = blocks

    # ----- the others' rows -------------------------------------------------------------
    def peer_pending_since(self, worker_id: str) -> tuple[int, float]:
        """The other live processes' pending prefill blocks on `worker_id`, and when it last
        started on a prompt as any process saw it (0.0: unseen), in one column lookup (the
        KV router reads both for every candidate)."""
        column = self._find(worker_id)
        if column is None:
            return 0, 0.0
        return self._others_sum(self._pending, column), self._starts[column]

    def peer_loads(self, worker_id: str) -> tuple[int, float, int]:
        """What the KV router reads of the others for every candidate, in one column
        lookup and one copy of each of its two slices: their pending prefill blocks there,
        when it last started on a prompt (0.0: unseen), and their largest routed prompt
        blocks there (`peer_blocks`)."""
        column = self._find(worker_id)
        if column is None:
            return 0, 0.0, 0
        base = column * ROWS
        end = base + self.rows_used
        pending = self._pending[base:end].tolist()
        blocks = self._blocks[base:end].tolist()
        pending[self.row] = blocks[self.row] = 0  # ours, and the gone rows', do not count
        for row in self._dead:
            pending[row] = blocks[row] = 0
        return sum(pending), self._starts[column], max(blocks)

    def peer_requests(self, worker_id: str) -> int:
        """The other live processes' in-flight requests on `worker_id`."""
        column = self._find(worker_id)
        if column is None:  # no process counted anything there yet
            return 0
        return self._others_sum(self._requests, column)

    def peer_blocks(self, worker_id: str) -> int:
        """The largest other live process's routed prompt blocks on `worker_id`: a lower
        bound of their deduplicated footprint there. Each row's blocks are distinct within
        its process only, so a sum counted a hot system prompt once per process: a worker
        serving one prompt's hits from 7 processes looked ~7 prompts busy, beyond the KV
        router's tie band, and the prompt's next requests went elsewhere and computed it
        again (small_cache at 7 processes, hit rate 0.94-0.95 of the oracle's with the
        sum, 0.97-0.99 with the largest row; benchmarks/README.md). The worker's own
        report (deduplicated by its engine, one load report late) lifts a bound too low:
        the router takes the larger of the two."""
        column = self._find(worker_id)
        if column is None:
            return 0
        cells, base = self._blocks, column * ROWS
        return max([cells[base + row] for row in self._peer_rows], default=0)

    def _others_sum(self, cells: memoryview, column: int) -> int:
        """A column's cells summed over the other live rows."""
        base = column * ROWS
        total = sum(cells[base : base + self.rows_used]) - cells[base + self.row]
        for row in self._dead:
            total -= cells[base + row]
        return total

    # ----- when each worker started on its current prefill (one cell per worker) -----------
    def mark_prefill_start(self, worker_id: str, at: float) -> None:
        """Some process saw `worker_id` start on its next prompt at `at` (monotonic s)."""
        self._starts[self.column_for(worker_id)] = at

    # ----- recently routed prompts (a hash table per row) ---------------------------------
    def add_prefix(self, worker_id: str, hashes: list[int]) -> None:
        """One more of our in-flight prompts on `worker_id`: its sampled block hashes count
        once more (an entry whose probe run is full is left out: a lookup then finds a
        shorter prefix, no false one)."""
        column = self.column_for(worker_id)
        ours, counts = self._our_prefixes, self._prefix_counts
        keys, columns = self._prefix_keys, self._prefix_columns
        base = self.row * PREFIX_SLOTS
        for position in prefix_positions(len(hashes)):
            key = hashes[position]
            slot = ours.get((key, column))
            if slot is not None:
                counts[slot] += 1
                continue
            home = key % PREFIX_SLOTS
            for probe in range(PREFIX_PROBES):
                slot = base + ((home + probe) & (PREFIX_SLOTS - 1))
                if not counts[slot]:  # free: its column and key first, the count makes it live
                    columns[slot] = column
                    keys[slot] = key
                    counts[slot] = 1
                    ours[key, column] = slot
                    break

    def remove_prefix(self, worker_id: str, hashes: list[int]) -> None:
        """One of our in-flight prompts on `worker_id` finished: its entries count once less."""
        column = self._columns.get(worker_id)
        if column is None:
            return
        ours, counts = self._our_prefixes, self._prefix_counts
        for position in prefix_positions(len(hashes)):
            key = (hashes[position], column)
            slot = ours.get(key)
            if slot is None:  # left out when added
                continue
            left = counts[slot] - 1
            counts[slot] = left
            if not left:
                del ours[key]

    def peer_prefix_depths(
        self, hashes: list[int], known: Mapping[str, int] | None = None
    ) -> dict[str, int]:
        """Worker id -> how many leading blocks of a prompt with these full-block hashes the
        other live processes' in-flight prompts there share (at the sampled positions: up to
        `PREFIX_STRIDE` - 1 blocks short), where that is deeper than `known` (the caller's
        own depths: the KV index's) says. Hashes are chained, so a match at a position means
        the whole prefix up to it: per row and worker one look at the first position deeper
        than known or an earlier row found, and a binary search only where it matches (a
        hot prompt in flight in every process was searched whole per worker and row)."""
        if not hashes:
            return {}
        positions = prefix_positions(len(hashes))
        last = len(positions) - 1
        by_column: dict[int, int] = {}  # the depths found, where deeper than known
        floors: dict[int, int] = {}  # column -> the depth known
        if known:
            columns_of = self._columns
            for worker_id, depth in known.items():
                column = columns_of.get(worker_id)
                if column is not None:
                    floors[column] = depth
        first = hashes[0]
        keys, counts, columns = self._prefix_keys, self._prefix_counts, self._prefix_columns
        home = first % PREFIX_SLOTS
        slots = [(home + probe) & (PREFIX_SLOTS - 1) for probe in range(PREFIX_PROBES)]
        for row in self._peer_rows:
            base = row * PREFIX_SLOTS
            found = [
                columns[base + slot] for slot in slots
                if keys[base + slot] == first and counts[base + slot] > 0
            ]  # fmt: skip
            for column in found:
                floor = by_column.get(column) or floors.get(column, 0)
                low = bisect.bisect_left(positions, floor)  # the first deeper than floor
                if low > last:  # the whole prompt is known there
                    continue
                if low and not self._holds(row, hashes[positions[low]], column):
                    continue  # this row's prompt there goes no deeper than known
                high = last  # positions[low] is known to match
                while low < high:
                    middle = (low + high + 1) // 2
                    if self._holds(row, hashes[positions[middle]], column):
                        low = middle
                    else:
                        high = middle - 1
                by_column[column] = positions[low] + 1
        depths: dict[str, int] = {}
        names = self._names_by_column
        for column, depth in by_column.items():
            if column >= len(names):  # named by another process since we last read
                self._sync_names()
            if column < len(names):
                depths[names[column]] = depth
        return depths

    def _holds(self, row: int, key: int, column: int) -> bool:
        keys, counts, columns = self._prefix_keys, self._prefix_counts, self._prefix_columns
        base, home = row * PREFIX_SLOTS, key % PREFIX_SLOTS
        for probe in range(PREFIX_PROBES):
            slot = base + ((home + probe) & (PREFIX_SLOTS - 1))
            if keys[slot] == key and counts[slot] > 0 and columns[slot] == column:
                return True
        return False

    # ----- the KV router's turns (one cell per worker, shared by every row) ------------------
    def mark_turn(self, worker_id: str, stamp: int) -> None:
        """Some process routed to `worker_id` at `stamp` (TableFull: no column is left)."""
        self._turns[self.column_for(worker_id)] = stamp

    def turn_of(self, worker_id: str) -> int | None:
        """When any process last routed to `worker_id` (None: none yet)."""
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
        self._peer_rows = [r for r in range(self.rows_used) if r != self.row and r not in dead]
        return dead

    # ----- columns ----------------------------------------------------------------------
    def column_for(self, worker_id: str) -> int:
        """`worker_id`'s column, named now if no process has named it yet."""
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
            self._names_by_column.append(worker_id)
        return column

    def _find(self, worker_id: str) -> int | None:
        """`worker_id`'s column, ours or one another process named since we last looked
        (None: no process has named it)."""
        column = self._columns.get(worker_id)
        if column is None and self._header[_NAMED] != len(self._columns):  # names added
            self._sync_names()
            column = self._columns.get(worker_id)
        return column

    def _sync_names(self) -> None:
        with self._locked(fcntl.LOCK_SH):
            self._read_names()

    def _read_names(self) -> None:
        """Under the lock: the names appended since we last read (names are append-only)."""
        names = self._names
        for column in range(len(self._columns), min(self._header[_NAMED], COLUMNS)):
            slot = column * NAME_BYTES
            length = names[slot]
            worker_id = bytes(names[slot + 1 : slot + 1 + length]).decode()
            self._columns[worker_id] = column
            self._names_by_column.append(worker_id)

    def close(self) -> None:
        views = (self._header, self._pids, self._names, self._requests, self._blocks,
                 self._turns, self._pending, self._starts, self._prefix_keys,
                 self._prefix_columns, self._prefix_counts)  # fmt: skip
        for view in views:
            view.release()
        self._map.close()
        os.close(self._fd)


_NO_COUNTS = memoryview(bytes(4 * PREFIX_SLOTS)).cast("i")  # a row's prefix counts, cleared
_POSITIONS: dict[int, tuple[int, ...]] = {}


def prefix_positions(blocks: int) -> tuple[int, ...]:
    """The block positions of a prompt of `blocks` full blocks kept in the prefix table:
    0, 1, 3, 7 (short prompts), every `PREFIX_STRIDE`th from 15 on, and the last (an exact
    repeat matches whole). Any prompt's positions below its length are every other's too, so
    a shared prefix matches at each of them up to its depth."""
    positions = _POSITIONS.get(blocks)
    if positions is None:
        early = [p for p in (0, 1, 3, 7) if p < blocks]
        strided = range(PREFIX_STRIDE - 1, blocks, PREFIX_STRIDE)
        last = [blocks - 1] if blocks and (blocks - 1) not in (*early, *strided) else []
        positions = _POSITIONS[blocks] = (*early, *strided, *last)
    return positions


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


class SharedRouting:
    """What the KV router's choice needs from the deployment's other frontend processes
    besides their counts: their pending prefill per worker, when each worker started on its
    current prefill, and how deep their in-flight prompts share a new prompt's prefix where
    (`kv_router.PeerRouting`). A worker without a column (TableFull) is not shared."""

    def __init__(self, table: LoadTable) -> None:
        self._table = table
        # the reads on the request path: the table's own methods, no call in between
        self.peer_pending_since = table.peer_pending_since
        self.peer_loads = table.peer_loads
        self.prefix_depths = table.peer_prefix_depths

    def routed(self, worker_id: str, hashes: list[int]) -> None:
        with contextlib.suppress(TableFull):
            self._table.add_prefix(worker_id, hashes)

    def released(self, worker_id: str, hashes: list[int]) -> None:
        self._table.remove_prefix(worker_id, hashes)

    def pending_changed(self, worker_id: str, blocks: int) -> None:
        with contextlib.suppress(TableFull):
            self._table.write_pending(worker_id, blocks)

    def prefill_started(self, worker_id: str, at: float) -> None:
        with contextlib.suppress(TableFull):
            self._table.mark_prefill_start(worker_id, at)


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

"""One round-robin rotation for all the frontend processes of a deployment.

Several frontend processes share the port (`frontend.workers` > 1) and each routes the
requests the kernel hands it. With a rotation of its own each, their choices collide like
random ones (benchmarks/README.md, "One rotation across frontend processes"), so they take
turns from one counter instead: 8 bytes of a file the plan names (`ROTATION_FILE_ENV`, in
/dev/shm: node-local memory), mapped by every process, read and incremented per choice under
an exclusive `flock`. Whoever comes first creates it; a restarted process maps it again and
goes on from where the others are; the supervisor removes it when the deployment stops.

Why a lock: without one, two processes choosing at the same instant (a lockstep client's
requests arrive together) read the same value; on the device 7 unlocked processes drawing
together repeated 8-12% of their tickets. The lock costs two system calls, ~2 µs a choice
there (benchmarks/bench_rotation.py), and is held for two memory accesses; a process dying
while holding it releases it with its descriptor.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
from collections.abc import Iterator, Mapping

from contract.plan import ROTATION_FILE_ENV
from frontend.shared_memory import map_shared_file

logger = logging.getLogger(__name__)

COUNTER_BYTES = 8
SPIN_TRIES = 64  # non-blocking tries (~1 µs each) before sleeping on the lock
_WRAP = 1 << 64


class SharedRotation:
    """Tickets 0, 1, 2, ... drawn from a counter file that other processes map too."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd, self._map = map_shared_file(path, COUNTER_BYTES)
        self._counter = memoryview(self._map).cast("Q")

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        counter = self._counter
        self._lock()
        try:
            ticket = counter[0]
            counter[0] = (ticket + 1) % _WRAP
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return ticket

    def _lock(self) -> None:
        """Take the lock, retrying a while before waiting for it in the kernel: it is held
        for a microsecond, and a waiter put to sleep takes up to ~0.3 ms to wake (device, 7
        processes drawing at the same instants: p99.9 of a draw 278 µs sleeping)."""
        for _ in range(SPIN_TRIES):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # its holder was descheduled: sleep

    def close(self) -> None:
        self._counter.release()
        self._map.close()
        os.close(self._fd)


def process_rotation(process_count: int, environ: Mapping[str, str] = os.environ) -> Iterator[int]:
    """The round-robin tickets of this frontend process: its own count when it runs alone;
    the deployment's shared counter when it is one of several, or (with a warning) its own
    count when the plan named no counter file or it cannot be opened."""
    if process_count < 2:
        return itertools.count()
    path = environ.get(ROTATION_FILE_ENV, "")
    if not path:
        logger.warning("%s is unset: round robin rotates in this frontend process only, so "
                       "the %d processes' choices collide", ROTATION_FILE_ENV,
                       process_count)  # fmt: skip
        return itertools.count()
    try:
        return SharedRotation(path)
    except OSError as exc:
        logger.warning("%s=%s: cannot map the shared round-robin counter (%s); this process "
                       "rotates on its own", ROTATION_FILE_ENV, path, exc)  # fmt: skip
        return itertools.count()

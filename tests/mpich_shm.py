"""Which MPICH shared-memory segments test processes map: tests that kill TP ranks check
that no name of theirs is left in /dev/shm (mpi_workers/mpi_shm.py says why)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from mpi_workers.mpi_shm import mapped_segment_names


def mpich_segments(pids: list[int]) -> set[str]:
    """The MPICH segment names (/dev/shm/mpich_*) these processes map, whether or not the
    name is still in /dev/shm. The namespace Slurm cluster's nodes share this machine's
    /dev/shm, so this holds for its ranks too."""
    names: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            maps = Path(f"/proc/{pid}/maps").read_text()
            names |= mapped_segment_names(maps, unlinked=True)
    return names

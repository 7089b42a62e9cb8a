"""One rank of a test MPI group for tests/mpi_workers/test_mpi_shm.py: MPI_Init (mpi4py),
with `--release` the product's `release_segment_names`, then write `OUT/rank<R>.json` (its PID
and the MPICH segments it maps, unlinked or not) and wait until `OUT/stop` exists; then return,
so mpi4py's MPI_Finalize runs (MPICH's own unlink).

    mpirun -n N python -m mpi_workers.rank_guard shm_script.py OUT [--release]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mpi4py import MPI

from mpi_workers.mpi_shm import SEGMENT_PREFIXES, SHM_DIR, release_segment_names


def mapped_names() -> list[str]:
    """MPICH segment names this process maps, with or without a name left in /dev/shm."""
    names = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        path = Path(fields[5].removesuffix(" (deleted)")) if len(fields) == 6 else None
        if path is not None and path.parent == SHM_DIR and path.name.startswith(SEGMENT_PREFIXES):
            names.add(path.name)
    return sorted(names)


def main() -> int:
    out = Path(sys.argv[1])
    world = MPI.COMM_WORLD
    unlinked = release_segment_names(world) if "--release" in sys.argv[2:] else []
    report = {"pid": os.getpid(), "mapped": mapped_names(), "unlinked": unlinked}
    tmp = out / f".rank{world.Get_rank()}.json"
    tmp.write_text(json.dumps(report))
    tmp.rename(out / f"rank{world.Get_rank()}.json")
    while not (out / "stop").exists():
        time.sleep(0.05)
    world.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

from mpi_workers.mpi_shm import mapped_segment_names, release_segment_names


def main() -> int:
    out = Path(sys.argv[1])
    world = MPI.COMM_WORLD
    unlinked = release_segment_names(world) if "--release" in sys.argv[2:] else []
    mapped = mapped_segment_names(Path("/proc/self/maps").read_text(), unlinked=True)
    report = {"pid": os.getpid(), "mapped": sorted(mapped), "unlinked": unlinked}
    tmp = out / f".rank{world.Get_rank()}.json"
    tmp.write_text(json.dumps(report))
    tmp.rename(out / f"rank{world.Get_rank()}.json")
    while not (out / "stop").exists():
        time.sleep(0.05)
    world.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())

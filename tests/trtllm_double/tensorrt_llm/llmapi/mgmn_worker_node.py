"""TEST DOUBLE of `tensorrt_llm.llmapi.mgmn_worker_node`: an MPI rank > 0 under the launcher.

The real one serves tasks from rank 0 through `MPICommExecutor`; the double has no model to
shard, so a worker reports its host to the leader and waits (polling, not spinning) until the
leader says exit.
"""

from __future__ import annotations

import logging
import time

from mpi4py import MPI

from mpi_workers.mpi_shm import release_segment_names
from tensorrt_llm.llmapi.mgmn_leader_node import EXIT_TAG, rank_hostname


def main() -> None:
    comm = MPI.COMM_WORLD
    release_segment_names(comm)  # with the leader's: see mgmn_leader_node
    comm.gather(rank_hostname(), root=0)
    request = comm.irecv(source=0, tag=EXIT_TAG)
    while True:
        done, _ = request.test()
        if done:
            break
        time.sleep(0.05)
    logging.warning(f"worker rank{comm.rank} quited")


if __name__ == "__main__":
    main()

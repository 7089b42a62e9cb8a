"""Which worker group this MPI rank belongs to, its rank in the group, and the group's leader.

Two launch shapes are accepted: each engine instance is its own MPI world (`hpcserve up`
runs `mpirun -n TP` per instance; Slurm one `srun` step per instance), or one world holds
every instance of the config (ranks laid out group by group, instance by instance, TP
consecutive ranks each) and is split into one communicator per instance. mpi4py is imported
only when a group has tp > 1, so TP=1 workers never need MPI; right after MPI_Init the world's
MPICH shared-memory names are unlinked (`mpi_workers.mpi_shm`: a crashed group leaks none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from contract.config import ConfigError, DeploymentConfig
from mpi_workers.mpi_shm import release_segment_names


@dataclass(frozen=True)
class RankGroup:
    """This process's place: config group `group` (role), instance `index`, rank `rank` of
    `size`; rank 0 is the leader. `comm` is the instance's communicator (None when size 1)."""

    role: str
    group: int
    index: int
    rank: int
    size: int
    world_rank: int = 0
    leader_world_rank: int = 0
    comm: Any = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def resolve_rank_group(
    config: DeploymentConfig, group: int, index: int, world: Any = None
) -> RankGroup:
    """This rank's group from the config and the MPI world (`MPI.COMM_WORLD` by default).

    Raises ConfigError naming `workers.N.tp` when the world size fits neither launch shape.
    """
    spec = config.workers[group]
    if config.engine.kind == "trtllm":
        # TensorRT-LLM runs its own ranks: trtllm-llmapi-launch hides the MPI world from
        # our worker (rank 0's command), which is one process holding the `LLM`.
        return RankGroup(spec.role, group, index, 0, 1)
    if spec.tp == 1 and world is None:
        return RankGroup(spec.role, group, index, 0, 1)
    if world is None:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        if world.Get_size() > 1:  # no crash may leave MPICH's segments in /dev/shm
            release_segment_names(world)
    size, rank = world.Get_size(), world.Get_rank()
    if size == spec.tp:
        return RankGroup(spec.role, group, index, rank, size, rank, 0, world if size > 1 else None)
    layout = [(g, i) for g, w in enumerate(config.workers) for i in range(w.count)]
    sizes = [config.workers[g].tp for g, _ in layout]
    if size == sum(sizes) and len(layout) > 1:
        first = 0
        for color, ((g, i), tp) in enumerate(zip(layout, sizes, strict=True)):
            if first <= rank < first + tp:
                comm = world.Split(color, rank)
                w = config.workers[g]
                return RankGroup(w.role, g, i, rank - first, tp, rank, first, comm)
            first += tp
    raise ConfigError(
        f"workers.{group}.tp: the MPI world has {size} rank(s) but workers.{group}.tp is "
        f"{spec.tp} (one world per instance) and the whole config needs {sum(sizes)}; "
        f"launch with `mpirun -n {spec.tp}`"
    )


def leave_group(code: int) -> NoReturn:
    """End this tensor-parallel rank's process now, with `code`.

    A rank that finished cleanly (code 0) finalizes MPI first, while every library is still
    alive: MPI_Finalize waits for all the world's ranks (a PMI barrier), and a rank that dies
    in the interpreter's teardown instead (torch's/gloo's C++ destructors abort now and then
    under load: "terminate called without an active exception") would leave its peers in
    MPI_Finalize for good. Then it leaves without that teardown. A failed rank (code != 0)
    skips MPI_Finalize: its peers may be blocked in a collective.
    """
    import logging
    import os
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code == 0:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    os._exit(code)

"""Take the names of this MPI world's MPICH shared-memory segments out of /dev/shm as soon as
every rank on the node has them mapped, so that no crash can leave them behind.

Why: MPICH's ch4 POSIX shared memory (pip `mpich` 5.0.2, our venv's) opens
`/dev/shm/mpich_shm_<hash of the PMI job name>_<node>` inside MPI_Init (`MPL_initshm_open`:
the local rank that wins `O_EXCL` creates it, the others open it by name) and unlinks it only
in MPI_Finalize (`MPL_initshm_freeall`, by that creator). A tensor-parallel group that fails
never finalizes: a SIGKILLed rank, a rank's failure path (`os._exit`: peers may be stuck in a
collective), the supervisor's SIGKILL of stragglers, Slurm's `--kill-on-bad-exit`. Each crash
or restart of a group then left 1-3 MB of tmpfs (RAM) in /dev/shm for good. MPICH has no
setting against it (`MPIR_CVAR_NOLOCAL` still creates one segment per rank).

The name is only how local ranks find the segment; the mappings hold the memory. Once all
ranks on this node map it (we check: an allgather over the node), one of them unlinks it, as
older MPICH did after its init barrier (`MPIDU_Init_shm_init`); the memory goes when the last
rank exits, however it exits, and MPI_Finalize's own `shm_unlink` then finds no name (its
result is ignored). A rank only ever unlinks names that every rank of its own world on its
node maps: another group's segments are never touched. On Slurm each node's ranks do the same
for that node. (A name left behind on Slurm is worse than lost memory: the next step with the
same job and step id opens the stale segment instead of creating a fresh one.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# mpich_shm_: the POSIX shm slab of every world; mpich_vci_: its extra slab when MPICH runs
# several VCIs (threads), opened the same way.
SEGMENT_PREFIXES = ("mpich_shm_", "mpich_vci_")
_DELETED = " (deleted)"


def mapped_segment_names(maps: str, *, unlinked: bool = False) -> set[str]:
    """The MPICH segment names a `/proc/PID/maps` text maps that still have their name in
    /dev/shm; with `unlinked` also those whose name is gone (tests: what a rank mapped)."""
    names = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or (fields[5].endswith(_DELETED) and not unlinked):
            continue
        path = Path(fields[5].removesuffix(_DELETED))
        if path.parent == SHM_DIR and path.name.startswith(SEGMENT_PREFIXES):
            names.add(path.name)
    return names


def release_segment_names(world: Any) -> list[str]:
    """Collective over `world` (an mpi4py communicator right after MPI_Init): unlink the
    MPICH segment names that every rank of `world` on this node maps. Returns the names this
    rank unlinked (node-local rank 0 unlinks; the others return [])."""
    from mpi4py import MPI

    try:
        mine = mapped_segment_names(Path("/proc/self/maps").read_text())
    except OSError:  # no procfs: nothing we can name, but the collective below still runs
        mine = set()
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        everyone = node.allgather(sorted(mine))
        node_rank = node.Get_rank()
    finally:
        node.Free()
    if node_rank != 0:
        return []
    unlinked = []
    for name in sorted(set.intersection(*(set(names) for names in everyone))):
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            continue
        except OSError as exc:  # never worth failing the rank for
            logger.warning("cannot unlink MPICH shared memory %s: %s", name, exc)
            continue
        unlinked.append(name)
    if unlinked:
        logger.info("unlinked MPICH shared memory %s (mapped by all %d local ranks; freed "
                    "when the last one exits)", ", ".join(unlinked), len(everyone))  # fmt: skip
    return unlinked


def slurm_step_tag(job_id: str, step_id: str) -> str:
    """The hash MPICH names a Slurm step's segments by: FNV-1a (32 bits) of its PMI job name
    `<job>.<step>` (pmi2), in hex, as in `mpich_shm_<tag>_<node>` (checked: job 7 step 2's
    are `mpich_shm_16f4724e_*`)."""
    value = 0x811C9DC5
    for byte in f"{job_id}.{step_id}".encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return f"{value:08x}"


def forget_failed_step_segments(environ: dict[str, str] | None = None) -> list[str]:
    """After a rank of a Slurm step failed: its step's MPICH segment names, out of /dev/shm.
    A rank that dies inside MPI_Init (before `release_segment_names`; the supervisor starts
    such a worker again) leaves them, and nothing else would: no later step has the same
    job and step id, and the step is over (--kill-on-bad-exit). The mappings of ranks still
    alive keep their memory; only the names go. Returns the names removed (none outside
    Slurm: hydra's job names are not known here)."""
    environ = dict(os.environ) if environ is None else environ
    job_id, step_id = environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID")
    if not job_id or not step_id:
        return []
    tag = slurm_step_tag(job_id, step_id)
    removed = []
    for prefix in SEGMENT_PREFIXES:
        for path in sorted(SHM_DIR.glob(f"{prefix}{tag}_*")):
            try:
                path.unlink()
            except OSError:  # gone already (another rank of the node), or not ours to remove
                continue
            removed.append(path.name)
    return removed

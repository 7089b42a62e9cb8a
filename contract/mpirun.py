"""Find the local `mpirun` and the flags its implementation needs (stdlib only, so the
launcher and the GPU benchmark share it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def find_mpirun() -> str | None:
    """`mpirun` next to our Python (pip `mpich` in the venv) first, else the one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.is_file() else shutil.which("mpirun")


def mpi_launcher(mpirun: str) -> tuple[str, ...]:
    """The `mpirun` prefix for a local TP group (append `-n N argv...`).

    MPICH hydra: `-disable-auto-cleanup`, so one dead rank does not make hydra kill the
    others: the leader fails its requests, deregisters and exits non-zero itself (ranks run
    under `mpi_workers.rank_guard`, because hydra still kills everything when a rank dies
    from a signal). Open MPI: `--mca orte_abort_on_non_zero_status 0` (the same, for a
    non-zero exit), `--oversubscribe` (more ranks than cores is fine on CPU), `--bind-to none`,
    and `--allow-run-as-root` when we are root.
    """
    version = subprocess.run(
        [mpirun, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        flags = ["--mca", "orte_abort_on_non_zero_status", "0", "--oversubscribe"]
        flags += ["--bind-to", "none"]
        if os.geteuid() == 0:
            flags.insert(0, "--allow-run-as-root")
        return (mpirun, *flags)
    if "HYDRA" in version:
        return (mpirun, "-disable-auto-cleanup")
    return (mpirun,)


# What MPICH and Open MPI print when a rank's MPI_Init fails: the world of a tensor-parallel
# group never formed (the PMI exchange of the ranks' addresses went wrong, a peer was gone).
MPI_INIT_FAILURE_MARKS = (
    "Fatal error in internal_Init_thread",  # MPICH 4-5: MPI_Init_thread
    "Fatal error in PMPI_Init",  # older MPICH
    "MPI_INIT has failed",  # Open MPI
    "It looks like MPI_INIT failed",  # Open MPI
)


def mpi_init_failed(log_text: str) -> bool:
    """True when a worker's log shows that its ranks' MPI_Init failed: a start-up failure of
    the MPI world (a bootstrap that can go wrong once and right the next time), as opposed
    to the worker's own (a missing GPU, a bad model path)."""
    return any(mark in log_text for mark in MPI_INIT_FAILURE_MARKS)

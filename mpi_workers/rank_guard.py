"""Run an MPI rank as a child of a small guard process, so a rank that dies leaves a plain
non-zero exit code behind instead of a death by signal.

Why: MPICH's hydra kills every rank of a job at once when one rank dies from a signal, even
with `-disable-auto-cleanup`, so the TP leader would be SIGKILLed before it can fail its
requests and deregister. Seen through the guard, a SIGKILLed follower is an ordinary exit 137,
the leader survives, notices the closed connection and shuts its worker down itself.
The guard imports nothing heavy and does not touch MPI; the child inherits the launcher's
environment (PMI/PMIx variables) and is the real rank. SIGTERM/SIGINT are passed on;
hydra's SIGUSR1 failure notices are ignored. A rank of a Slurm step that fails takes its
step's MPICH segment names out of /dev/shm (`mpi_shm.forget_failed_step_segments`: a rank that
died inside MPI_Init left them).

    python -m mpi_workers.rank_guard SCRIPT_OR_-m_MODULE ARGS...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from mpi_workers.mpi_shm import forget_failed_step_segments

GUARD_VARIABLE = "HPCSERVE_RANK_GUARD"
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def launched_as_mpi_rank() -> bool:
    """True under `mpirun -n N` (N > 1) when no guard sits above us yet."""
    if os.environ.get(GUARD_VARIABLE) == "child":
        return False
    return any(os.environ.get(name, "1").isdigit() and int(os.environ[name]) > 1
               for name in _SIZE_VARIABLES if name in os.environ)  # fmt: skip


def run_guarded(argv: list[str]) -> int:
    """Run `python ARGV` as the rank; return its exit code (128 + signal if it was killed)."""
    env = {**os.environ, GUARD_VARIABLE: "child"}
    # close_fds=False: PMI talks to the launcher over an inherited descriptor (PMI_FD).
    child = subprocess.Popen([sys.executable, *argv], env=env, close_fds=False)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    # Hydra with -disable-auto-cleanup sends SIGUSR1 to the ranks it spawned when a rank
    # exits (a failure notice); its default action would kill the guard, and the rank with it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    code = child.wait()
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    if code != 0:
        removed = forget_failed_step_segments()
        if removed:
            print(f"rank_guard: MPI rank {rank} failed: removed its step's MPICH shared "
                  f"memory names {', '.join(removed)}", file=sys.stderr, flush=True)  # fmt: skip
    if code < 0:
        print(
            f"rank_guard: MPI rank {rank} (pid {child.pid}) died from signal "
            f"{signal.Signals(-code).name}", file=sys.stderr, flush=True,
        )  # fmt: skip
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(run_guarded(sys.argv[1:]))

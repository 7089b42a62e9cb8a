"""How a deployment's Slurm job ends: the time limit's warning, preemption, removal.

Slurm tells the job it is about to end in one of these ways, and the supervisor
(`slurm.supervise`) answers each with the same graceful end (stop taking requests, let the
workers finish what they hold, stop the rest, state FINISHED with a reason):

- **time limit**: `#SBATCH --signal=B:USR1@<slurm.drain_s>` sends SIGUSR1 to the batch
  script (the supervisor) only, `drain_s` before the limit (Slurm may send it up to a minute
  early). Nothing else is signalled, so the supervisor first hands over to its successor
  generation (waits for it to be READY, bounded) and then drains.
- **preemption** (and `scontrol requeue`): Slurm sets the job's end to now + GraceTime and
  sends SIGCONT and SIGTERM to the batch script and every step at once, then SIGKILL at the
  new end. The workers drain on their own SIGTERM; the supervisor waits for them.
- **scancel**: SIGTERM to everything too, the job already COMPLETING/CANCELLED in squeue;
  `scontrol requeue` the same, with Slurm's restart count already one above this run's.
- **removal** (`hpcserve scale --remove`): a `remove` file in the job dir, then SIGUSR1.

The reason is told apart by what squeue says at the time of the SIGTERM.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

from contract.slurm_config import SlurmConfig

logger = logging.getLogger("slurm.lifecycle")

REMOVE_FILE = "remove"  # <job dir>/remove: `hpcserve scale --remove` asks this job to leave
MIN_DRAIN_S = 5.0


def squeue_field(job_id: str, field: str) -> str | None:
    """One squeue field (`%T` state, `%e` end time) of `job_id`; None when unknown."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", field],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = result.stdout.strip()
    return value if result.returncode == 0 and value else None


def end_time(job_id: str | None) -> float | None:
    """When Slurm will end the job (epoch seconds), from squeue's `%e`; None if unknown."""
    if not job_id:
        return None
    text = squeue_field(job_id, "%e")
    if not text or text in ("N/A", "Unknown", "NONE"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()  # squeue prints local time
    except ValueError:
        return None


def termination_reason(job_id: str | None) -> str:
    """Why a SIGTERM came, from the job's state in squeue at that moment."""
    state = (squeue_field(job_id, "%T") or "") if job_id else ""
    if state.startswith(("CANCELLED", "COMPLETING")):  # scancel and requeue: COMPLETING
        return "requeued" if requeued(job_id) else "cancelled"
    if state.startswith("TIMEOUT"):
        return "time limit"
    if state.startswith("REQUEUE"):
        return "requeued"
    if not job_id:
        return "stopped"
    # Still RUNNING (or PREEMPTED): nobody cancelled it, so this is preemption's warning
    # (SIGCONT + SIGTERM, GraceTime before the end).
    return "preempted"


def requeued(job_id: str | None) -> bool:
    """`scontrol requeue` (or a requeueing preemption) ends this run: Slurm has already
    counted the next run (`Restarts=` above this run's SLURM_RESTART_COUNT)."""
    if not job_id:
        return False
    try:
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    for field in result.stdout.split():
        key, _, value = field.partition("=")
        if key == "Restarts" and value.isdigit():
            return int(value) > int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    return False


def warning_reason(job_dir: Path) -> str:
    """Why a SIGUSR1 came: a removal asked for through the job dir, else the time limit."""
    return "removed" if (job_dir / REMOVE_FILE).exists() else "time limit"


class Ending:
    """The graceful end of one job: when to stop waiting for a successor and how long the
    workers may take to drain, both from the job's end time and `slurm.drain_s`."""

    def __init__(self, slurm: SlurmConfig, job_id: str | None) -> None:
        self.drain_s = float(slurm.drain_s)
        self.job_id = job_id
        self.reason: str | None = None
        self.since: float | None = None
        self.end: float | None = None

    def request(self, reason: str) -> None:
        """Called from a signal handler: only records (the serve loop acts on it)."""
        if self.reason is None:
            self.reason = reason
            self.since = time.time()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def learn_end(self) -> None:
        self.end = end_time(self.job_id)

    def handover_deadline(self) -> float:
        """The latest moment to start draining: half of drain_s before the end (the other
        half is for the drain itself)."""
        if self.end is not None:
            return self.end - self.drain_s / 2
        return (self.since or time.time()) + self.drain_s / 2

    def drain_budget(self) -> float:
        """Seconds the workers may take to finish what they hold."""
        if self.end is not None:
            left = self.end - time.time() - MIN_DRAIN_S
        else:
            left = self.drain_s / 2 - MIN_DRAIN_S
        return max(MIN_DRAIN_S, min(left, self.drain_s / 2))


def strip_job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for sbatch/srun run from inside a job for *another* job (a successor,
    a worker job): this job's SLURM_* variables would leak into it; SLURM_CONF stays."""
    source = dict(os.environ if environ is None else environ)
    return {key: value for key, value in source.items()
            if not key.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))
            or key == "SLURM_CONF"}  # fmt: skip

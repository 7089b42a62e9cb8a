"""Successor generations: the next job of the same deployment, submitted before this one ends.

With `slurm.successor: true` the supervisor of a READY job submits the same submitted
config (`<job dir>/deployment.yaml`, a fresh job dir) `slurm.successor_lead_s` before its
own time limit (at once when the job is shorter than that). Both jobs are generations of one
deployment (`slurm.jobs.deployment_dir`): the gateway sends new requests to the newest READY
one. When this job's end comes (SIGUSR1, `slurm.lifecycle`), it keeps serving until the
successor is READY (bounded by the hand-over deadline), then drains: its held requests
finish here, new ones already go to the successor.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from contract.config import ConfigError, DeploymentConfig, load_config
from slurm.jobs import JobError, SubmittedJob, submit
from slurm.lifecycle import Ending, strip_job_env
from slurm.state import read_state, write_state

if TYPE_CHECKING:
    from slurm.job_prepare import PreparedJob

logger = logging.getLogger("slurm.successor")

SETTLED = ("READY", "FAILED", "FINISHED")


def successor_config(job_dir: Path) -> DeploymentConfig:
    """The job's submitted config with a fresh job dir (run_dir) for the next generation."""
    config = load_config(job_dir / "deployment.yaml", environ={})
    data = config.model_dump(mode="json")
    data["run_dir"] = None
    return DeploymentConfig.model_validate(data)


def submit_successor(job_dir: Path) -> SubmittedJob:
    """sbatch the next generation (from inside this job: its SLURM_* variables dropped)."""
    return submit(successor_config(job_dir), python=sys.executable, env=strip_job_env())


class SuccessorPlan:
    """When to submit the successor and whether this job has handed over to it."""

    def __init__(self, job_dir: Path, enabled: bool, lead_s: float, ending: Ending) -> None:
        self.job_dir = job_dir
        self.enabled = enabled
        self.lead_s = lead_s
        self.due = ending.end - lead_s if ending.end is not None else time.time()
        self.successor: Path | None = None
        self.gave_up = False

    def tick(self, ending: Ending) -> None:
        """Submit the successor once it is due (or the end is already announced)."""
        if not self.enabled or self.successor is not None or self.gave_up:
            return
        if time.time() < self.due and not ending.requested:
            return
        try:
            submitted = submit_successor(self.job_dir)
        except (JobError, ConfigError, OSError) as exc:
            self.gave_up = True
            logger.error("could not submit the successor: %s", exc)
            write_state(self.job_dir, "READY", message=f"successor not submitted: {exc}")
            return
        self.successor = submitted.job_dir
        logger.info("submitted successor job %s (dir %s)", submitted.job_id, submitted.job_dir)
        if not ending.requested:
            write_state(self.job_dir, "READY", successor=str(submitted.job_dir))
        else:
            write_state(self.job_dir, "DRAINING", successor=str(submitted.job_dir))

    def handed_over(self, ending: Ending) -> bool:
        """True once this job may drain: no successor, the successor settled (READY, or
        failed), or the hand-over deadline passed."""
        if self.successor is None:
            if self.enabled and not self.gave_up and time.time() < ending.handover_deadline():
                self.tick(ending)  # the end came before the successor was due
                return self.successor is None
            return True
        state = read_state(self.successor)
        if state is not None and state.state in SETTLED:
            logger.info("successor %s is %s: handing over", self.successor, state.state)
            return True
        if time.time() >= ending.handover_deadline():
            logger.warning("successor %s not READY by the hand-over deadline: draining anyway",
                           self.successor)  # fmt: skip
            return True
        return False


def successor_plan(job: PreparedJob, ending: Ending) -> SuccessorPlan:
    slurm = job.slurm
    return SuccessorPlan(job.job_dir, slurm.successor, float(slurm.successor_lead_s), ending)

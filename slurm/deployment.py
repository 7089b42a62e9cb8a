"""A deployment across Slurm jobs: its generations, its worker jobs and its gateway.

A deployment is a name and a directory (`slurm.jobs.deployment_dir`): `generations/<job id>`
links to the job dir of each whole-deployment job (the first submit and every successor),
`workers/<job id>` to each worker-only job (`hpcserve scale`), and `gateway.json` names the
gateway that serves it (`hpcserve gateway`). The live generation is the newest READY one.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from contract.processes import pid_alive
from slurm.jobs import JobError, JobStatus, deployment_dir, job_status
from slurm.state import read_state

GENERATIONS = "generations"
WORKER_JOBS = "workers"
GATEWAY_FILE = "gateway.json"


def _job_dirs(folder: Path) -> list[tuple[str, Path]]:
    """(job id, job dir) of every link in `folder`, oldest job first."""
    if not folder.is_dir():
        return []
    found = [(link.name, link.resolve()) for link in folder.iterdir() if link.name.isdigit()]
    return sorted(found, key=lambda item: int(item[0]))


def generations(name: str) -> list[tuple[str, Path]]:
    return _job_dirs(deployment_dir(name) / GENERATIONS)


def worker_jobs(name: str) -> list[tuple[str, Path]]:
    return _job_dirs(deployment_dir(name) / WORKER_JOBS)


def ready_generations(name: str) -> list[tuple[str, str]]:
    """(job id, frontend URL) of every generation whose state file says READY, newest
    first. Cheap (state files only): the gateway calls it twice a second."""
    ready = []
    for job_id, job_dir in reversed(generations(name)):
        state = read_state(job_dir)
        if state is not None and state.state == "READY" and state.url:
            ready.append((job_id, state.url))
    return ready


def live_generation(name: str) -> tuple[str, Path] | None:
    """The newest generation Slurm and its state file both show serving."""
    for job_id, job_dir in reversed(generations(name)):
        with contextlib.suppress(JobError):
            if job_status(job_id).state == "READY":
                return job_id, job_dir
    return None


def read_gateway(name: str) -> dict | None:
    """The deployment's gateway (pid, url) when one is running."""
    try:
        info = json.loads((deployment_dir(name) / GATEWAY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if pid_alive(int(info.get("pid", 0))) else None


def write_gateway(name: str, url: str) -> Path:
    path = deployment_dir(name) / GATEWAY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "url": url}) + "\n")
    return path


@dataclass
class DeploymentStatus:
    name: str
    folder: Path
    generations: list[JobStatus] = field(default_factory=list)
    worker_jobs: list[JobStatus] = field(default_factory=list)
    gateway: dict | None = None

    def describe(self) -> str:
        lines = [f"deployment {self.name} ({self.folder})"]
        gateway = self.gateway["url"] if self.gateway else "none running"
        lines.append(f"gateway: {gateway}")
        lines.append("generations:")
        for status in self.generations:
            lines.append(f"  job {status.job_id}: {status.describe().splitlines()[0]}")
        if not self.generations:
            lines.append("  none")
        lines.append("worker jobs:")
        for status in self.worker_jobs:
            lines.append(f"  job {status.job_id}: {status.describe().splitlines()[0]}")
        if not self.worker_jobs:
            lines.append("  none")
        return "\n".join(lines)


def is_deployment(name: str) -> bool:
    return (deployment_dir(name) / GENERATIONS).is_dir()


def deployment_status(name: str) -> DeploymentStatus:
    if not is_deployment(name):
        raise JobError(f"no deployment {name!r} in {deployment_dir(name).parent}")
    status = DeploymentStatus(name, deployment_dir(name), gateway=read_gateway(name))
    status.generations = [job_status(str(job_dir)) for _, job_dir in generations(name)]
    status.worker_jobs = [job_status(str(job_dir)) for _, job_dir in worker_jobs(name)]
    return status


def cancel_deployment(name: str, rounds: int = 3) -> list[str]:
    """scancel every generation and worker job of the deployment still known to Slurm (a
    generation may submit its successor meanwhile: repeated until none is left); the job
    ids cancelled."""
    from slurm.jobs import ACTIVE, cancel, slurm_state

    cancelled: list[str] = []
    for _ in range(rounds):
        active = [(job_id, job_dir)
                  for job_id, job_dir in [*worker_jobs(name), *reversed(generations(name))]
                  if (slurm_state(job_id) or "GONE").split()[0] in ACTIVE]  # fmt: skip
        if not active:
            break
        for job_id, job_dir in active:
            cancel(str(job_dir))
            cancelled.append(job_id)
    return cancelled

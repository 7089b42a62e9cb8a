"""Elastic worker jobs: worker-only Slurm jobs that join a running deployment.

`hpcserve scale DEPLOYMENT --role agg --add N` submits N jobs, one engine instance each.
Each finds the deployment's etcd and NATS in the live generation's resolved config
(`<job dir>/config.yaml`), so its config is that one with one worker group (the role's
TP and engine) and the services not started. Its supervisor (`python -m slurm.worker_job`,
the same loop as a whole deployment's, `slurm.supervise.run`) starts the worker as an srun
step; it registers under the deployment's prefix as `<role>-j<job id>-i<n>` and the
frontend routes to it like any other. `--remove N` asks the newest N to leave (a `remove`
file, then SIGUSR1 to their batch script): each drains (finishes what it holds,
deregisters) and ends FINISHED "removed"; a worker job that reaches its time limit or is
preempted drains the same way. A worker job joins the generation live at its submission;
when that generation ends, its worker jobs lose their services and end with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from contract.config import ConfigError, DeploymentConfig, load_config
from contract.discovery import worker_key
from contract.plan import STAGE_WORKERS, PlannedProcess, Readiness, worker_argv, worker_env
from slurm.deployment import live_generation, worker_jobs
from slurm.job_prepare import PreparedJob
from slurm.jobs import (
    ACTIVE,
    JobError,
    SubmittedJob,
    cancel,
    new_job_dir,
    sbatch_job_dir,
    slurm_state,
)
from slurm.lifecycle import REMOVE_FILE
from slurm.render import render_script, slurm_options
from slurm.slicing import GroupNeed, SlicingError, slice_nodes
from slurm.state import read_state, write_state

logger = logging.getLogger("slurm.worker_job")

MODULE = "slurm.worker_job"
KIND_FILE = "worker_job"  # <job dir>/worker_job: marks a worker-only job


def worker_job_config(live_config: DeploymentConfig, role: str) -> DeploymentConfig:
    """The live generation's resolved config, reduced to one worker of `role` that uses
    the generation's etcd and NATS."""
    groups = [group for group in live_config.workers if group.role == role]
    if not groups:
        roles = sorted({group.role for group in live_config.workers})
        raise ConfigError(f"--role: the deployment has no {role!r} workers (it has "
                          f"{', '.join(roles)})")  # fmt: skip
    data = live_config.model_dump(mode="json")
    data["workers"] = [{**groups[0].model_dump(mode="json"), "count": 1, "per_process": None}]
    for service in ("etcd", "nats"):
        data["services"][service]["start"] = False
    data["run_dir"] = None
    slurm = data.get("slurm") or {}
    slurm.update({"nodes": None, "head_hosts_workers": True, "successor": False})
    data["slurm"] = slurm
    return DeploymentConfig.model_validate(data)


def submit_worker_jobs(deployment: str, role: str, count: int,
                       python: str = sys.executable) -> list[SubmittedJob]:  # fmt: skip
    """sbatch `count` worker-only jobs (one worker each) that join `deployment`."""
    if count < 1:
        raise ConfigError("--add: must be at least 1")
    live = live_generation(deployment)
    if live is None:
        raise JobError(f"deployment {deployment!r} has no READY generation to join")
    live_config = load_config(live[1] / "config.yaml", environ={})
    config = worker_job_config(live_config, role)
    submitted = []
    for _ in range(count):
        job_dir = new_job_dir(config)
        (job_dir / "deployment.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        )
        (job_dir / KIND_FILE).write_text(f"{deployment} {role} generation {live[0]}\n")
        script = render_script(config, job_dir=job_dir, python=python, module=MODULE)
        (job_dir / "job.sh").write_text(script)
        (job_dir / "job.sh").chmod(0o755)
        write_state(job_dir, "PENDING")
        submitted.append(sbatch_job_dir(job_dir, deployment, "workers"))
    return submitted


def remove_worker_jobs(deployment: str, role: str, count: int,
                       timeout_s: float = 120.0) -> list[str]:  # fmt: skip
    """Drain and end the newest `count` running worker jobs of `role`; their job ids."""
    candidates = []
    for job_id, job_dir in reversed(worker_jobs(deployment)):
        config = load_config(job_dir / "deployment.yaml", environ={})
        state = (slurm_state(job_id) or "GONE").split()[0]
        if config.workers[0].role == role and state in ACTIVE:
            candidates.append((job_id, job_dir))
    if len(candidates) < count:
        raise JobError(f"deployment {deployment!r} has {len(candidates)} running {role} "
                       f"worker job(s); cannot remove {count}")  # fmt: skip
    chosen = candidates[:count]
    for job_id, job_dir in chosen:
        (job_dir / REMOVE_FILE).touch()
        state = read_state(job_dir)
        if slurm_state(job_id) == "PENDING" or (state is not None and state.state == "PENDING"):
            cancel(str(job_dir))  # never started: nothing to drain
            continue
        result = subprocess.run(["scancel", "--batch", "--signal=USR1", job_id],
                                capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise JobError(f"scancel --signal=USR1 {job_id}: {result.stderr.strip()}")
    deadline = time.monotonic() + timeout_s
    for job_id, job_dir in chosen:
        while (slurm_state(job_id) or "GONE").split()[0] in ACTIVE:
            if time.monotonic() > deadline:
                logger.warning("worker job %s still running after its drain: cancelling", job_id)
                cancel(str(job_dir))
                break
            time.sleep(0.3)
    return [job_id for job_id, _ in chosen]


def prepare_worker_job(job_dir: Path, nodes: list[str]) -> PreparedJob:
    """At job start: the worker's plan (an srun step on the allocation) and its id."""
    config = load_config(job_dir / "deployment.yaml", environ={})
    slurm = slurm_options(config)
    job_id = os.environ.get("SLURM_JOB_ID", "0")
    group = config.workers[0]
    config_file = job_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    etcd = config.services.etcd.endpoint
    assert etcd is not None
    plan, needs = [], []
    for index in range(group.count):
        wid = f"{group.role}-j{job_id}-i{index}"
        argv = worker_argv(config, 0, index, config_file=str(config_file),
                           python=sys.executable, mpi_launcher=None)  # fmt: skip
        ready = Readiness("registrations", etcd_endpoint=etcd,
                          prefix=worker_key(config.name, group.role, wid), count=1)  # fmt: skip
        process = PlannedProcess(
            f"worker-{wid}", group.role, STAGE_WORKERS, (*argv, "--worker-id", wid), ready,
            worker_env(config, group), group=0, index=index, ranks=group.tp, worker_ids=(wid,),
        )  # fmt: skip
        plan.append(process)
        needs.append(GroupNeed(process.name, group.tp))
    try:
        slicing = slice_nodes(nodes, needs, gpus_per_node=slurm.gpus_per_node,
                              head_hosts_workers=True,
                              ranks_per_node=slurm.ranks_per_node)  # fmt: skip
    except SlicingError as exc:
        raise ConfigError(str(exc)) from None
    return PreparedJob(config, plan, slicing, head_addr="", url="", job_dir=job_dir)


def main(argv: list[str] | None = None) -> int:
    from slurm.supervise import run

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("nodes", nargs="+", help="the allocation, `scontrol show hostnames`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker job: %(message)s")  # fmt: skip
    return run(args.job_dir.resolve(), args.nodes, prepare_job=prepare_worker_job)


if __name__ == "__main__":
    raise SystemExit(main())

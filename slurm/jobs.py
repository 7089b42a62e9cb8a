"""Submit a deployment as a Slurm job (sbatch or submitit) and follow it: status, logs, cancel.

Every job gets a job dir (`run_dir`, or `~/.cache/hpcserve/slurm-jobs/<name>-<time>`): the
submitted config (`deployment.yaml`), the script (`job.sh`), the state file the script keeps
(`state.json`), the resolved config and `logs/<component>.log`. `<jobs root>/by-id/<job id>`
links a job id to its dir, so `hpcserve status 1234` finds it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from contract.config import DeploymentConfig, cache_dir
from slurm.render import node_count, render_script, slurm_options, tasks_per_node
from slurm.state import JobState, read_state, write_state

logger = logging.getLogger("slurm.jobs")

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
          "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "REQUEUE_HOLD", "REQUEUE_FED"}  # fmt: skip
SLURM_FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
SUBMITIT_DEFAULT_TIME_MIN = 60  # submitit's own default is 5 minutes: too short to serve
# Step-level variables of the submitit task: the script's own srun steps must not inherit them.
_STEP_VARS = (
    "SLURM_STEP",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "SLURM_NNODES",
    "SLURM_NODELIST",
    "SLURM_TASKS_PER_NODE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_GTIDS",
    "SLURM_TASK_PID",
    "SLURM_DISTRIBUTION",
    "SLURM_SRUN_COMM",
    "SLURM_CPU_BIND",
    "SLURM_LAUNCH_NODE_IPADDR",
    "SLURM_UNBUFFEREDIO",
    "SUBMITIT_",
)


class JobError(RuntimeError):
    """A Slurm command failed or a job cannot be found; the message says which."""


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    job_dir: Path
    via: str  # sbatch | submitit


@dataclass(frozen=True)
class JobStatus:
    state: str  # PENDING | STARTING | READY | FAILED | FINISHED
    job_id: str | None
    job_dir: Path
    slurm_state: str | None  # squeue/sacct's word; None once Slurm forgot the job
    url: str | None = None
    component: str | None = None
    message: str | None = None
    log_tail: str | None = None
    benchmark: str | None = None  # the benchmark step's word (running, valid, invalid ...)
    reason: str | None = None  # DRAINING/FINISHED: time limit | preempted | cancelled | removed

    def describe(self) -> str:
        head = f"{self.state}"
        if self.reason and self.state in ("DRAINING", "FINISHED"):
            head += f" ({self.reason})"
        if self.state == "READY" and self.url:
            head += f" {self.url}"
        if self.state == "FAILED":
            head += f" {self.component or 'job'}" + (f": {self.message}" if self.message else "")
        lines = [head, f"job {self.job_id or '?'} (slurm: {self.slurm_state or 'gone'}), "
                       f"dir {self.job_dir}"]  # fmt: skip
        if self.benchmark:
            lines.append(f"benchmark: {self.benchmark} ({self.job_dir / 'benchmark'})")
        if self.log_tail:
            lines += [f"--- last lines of {self.component or 'job'}'s log:", self.log_tail]
        return "\n".join(lines)


def jobs_root() -> Path:
    """Default job dirs and the by-id links; `HPCSERVE_SLURM_JOBS` moves them (tests)."""
    override = os.environ.get("HPCSERVE_SLURM_JOBS")
    return Path(override) if override else cache_dir() / "slurm-jobs"


def new_job_dir(config: DeploymentConfig) -> Path:
    if config.run_dir:
        job_dir = Path(config.run_dir).expanduser()
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        job_dir = jobs_root() / f"{config.name}-{stamp}"
        suffix = 1
        while job_dir.exists():
            suffix += 1
            job_dir = jobs_root() / f"{config.name}-{stamp}-{suffix}"
    (job_dir / "logs").mkdir(parents=True, exist_ok=True)
    return job_dir.resolve()


def prepare_job_dir(config: DeploymentConfig, python: str = sys.executable) -> Path:
    """Job dir with the submitted config, the rendered script and state PENDING."""
    job_dir = new_job_dir(config)
    (job_dir / "deployment.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    script = render_script(config, job_dir=job_dir, python=python)
    (job_dir / "job.sh").write_text(script)
    (job_dir / "job.sh").chmod(0o755)
    write_state(job_dir, "PENDING")
    return job_dir


def deployment_dir(name: str) -> Path:
    """A deployment across jobs: `generations/<job id>` and `workers/<job id>` link to the
    job dirs of its generations and worker jobs; `gateway.json` names its gateway."""
    return jobs_root() / "deployments" / name


def _link(folder: Path, job_id: str, job_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / job_id
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(job_dir)


def _record(
    job_dir: Path, job_id: str, via: str, deployment: str | None = None,
    kind: str = "generations",
) -> SubmittedJob:  # fmt: skip
    """Remember the job: its id in the job dir, `by-id/<id>`, and in its deployment's
    `generations/` (a whole deployment) or `workers/` (a worker job)."""
    (job_dir / "job_id").write_text(job_id + "\n")
    _link(jobs_root() / "by-id", job_id, job_dir)
    if deployment is not None:
        _link(deployment_dir(deployment) / kind, job_id, job_dir)
    logger.info("submitted job %s (%s), dir %s", job_id, via, job_dir)
    return SubmittedJob(job_id, job_dir, via)


def _run(
    argv: list[str], timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False, env=env)  # fmt: skip
    except FileNotFoundError as exc:
        raise JobError(f"{argv[0]} not found: is Slurm installed here?") from exc


def submit(
    config: DeploymentConfig, python: str = sys.executable, env: dict[str, str] | None = None
) -> SubmittedJob:
    """`sbatch` the rendered script; returns the job id and dir. The job is a generation of
    the deployment `config.name` (`deployment_dir`)."""
    job_dir = prepare_job_dir(config, python)
    return sbatch_job_dir(job_dir, config.name, "generations", env)


def sbatch_job_dir(
    job_dir: Path, deployment: str, kind: str, env: dict[str, str] | None = None
) -> SubmittedJob:
    result = _run(["sbatch", "--parsable", str(job_dir / "job.sh")], env=env)
    if result.returncode != 0:
        raise JobError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    return _record(job_dir, job_id, "sbatch", deployment, kind)


def run_script_on_head(script: str, log: str) -> int:
    """The function submitit runs (one task, on the head): the same script as sbatch's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STEP_VARS)}
    with open(log, "ab") as out:
        code = subprocess.run(["bash", script], env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False).returncode  # fmt: skip
    if code != 0:
        raise RuntimeError(f"{script} exited with {code}; see {log}")
    return code


def submitit_parameters(config: DeploymentConfig) -> dict[str, Any]:
    """AutoExecutor parameters: the same allocation the sbatch header asks for."""
    slurm = slurm_options(config)
    extra: dict[str, Any] = {}
    for line in slurm.extra_sbatch_lines:
        option = line.removeprefix("#SBATCH").strip().lstrip("-")
        key, sep, value = option.partition("=")
        extra[key] = value if sep else True
    for key, value in (("account", slurm.account), ("qos", slurm.qos), ("mem", slurm.mem),
                       ("constraint", slurm.constraint)):  # fmt: skip
        if value is not None:
            extra[key] = value
    if slurm.exclusive:
        extra["exclusive"] = True
    params: dict[str, Any] = {
        "name": config.name,
        "nodes": node_count(config),
        "tasks_per_node": tasks_per_node(slurm),
        "timeout_min": slurm.time_limit_minutes or SUBMITIT_DEFAULT_TIME_MIN,
        # submitit's own step: one task on the first (head) node; the script starts the rest.
        "slurm_srun_args": ["--nodes=1", "--ntasks=1"],
        "slurm_additional_parameters": extra,
    }
    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.cpus_per_task:
        params["cpus_per_task"] = slurm.cpus_per_task
    return params


def submit_with_submitit(config: DeploymentConfig, python: str = sys.executable) -> SubmittedJob:
    """Submit through `submitit.AutoExecutor`; the job's function runs the rendered script."""
    import submitit

    job_dir = prepare_job_dir(config, python)
    executor = submitit.AutoExecutor(folder=job_dir / "submitit", cluster="slurm")
    executor.update_parameters(**submitit_parameters(config))
    job = executor.submit(
        run_script_on_head, str(job_dir / "job.sh"), str(job_dir / "logs" / "sbatch.log")
    )
    return _record(job_dir, str(job.job_id), "submitit", config.name)


def find_job_dir(job: str) -> Path:
    """A job id (via `<jobs root>/by-id`) or a job dir path."""
    path = Path(job).expanduser()
    if (path / "state.json").exists() or (path / "job.sh").exists():
        return path.resolve()
    link = jobs_root() / "by-id" / job
    if link.exists():
        return link.resolve()
    raise JobError(f"no job {job!r}: not a job dir and not in {jobs_root() / 'by-id'}")


def job_id_of(job_dir: Path) -> str | None:
    with contextlib.suppress(OSError):
        return (job_dir / "job_id").read_text().strip() or None
    state = read_state(job_dir)
    return state.job_id if state else None


def slurm_state(job_id: str) -> str | None:
    """squeue's state (it keeps ended jobs for MinJobAge), else sacct's, else None."""
    result = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"])
    state = result.stdout.strip().split("\n")[0].strip() if result.returncode == 0 else ""
    if state:
        return state
    with contextlib.suppress(JobError, subprocess.TimeoutExpired):
        # Without accounting (the test cluster) sacct fails: then Slurm has forgotten the job.
        result = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], timeout=10)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().split("\n")[0].split()[0]
    return None


def log_tail(path: str | Path | None, lines: int = 30) -> str | None:
    if not path:
        return None
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:])


def job_status(job: str) -> JobStatus:
    """The state file, corrected by what Slurm says (a job Slurm ended is no longer READY)."""
    job_dir = find_job_dir(job)
    job_id = job_id_of(job_dir)
    recorded: JobState | None = read_state(job_dir)
    in_slurm = slurm_state(job_id) if job_id else None
    word = recorded.state if recorded else "PENDING"
    base = {"job_id": job_id, "job_dir": job_dir, "slurm_state": in_slurm,
            "benchmark": recorded.benchmark if recorded else None}  # fmt: skip
    if word == "FAILED":
        assert recorded is not None
        return JobStatus(
            "FAILED",
            url=recorded.url,
            component=recorded.component,
            message=recorded.message,
            log_tail=log_tail(recorded.log),
            **base,
        )
    ended = in_slurm is None or in_slurm.split()[0] not in ACTIVE
    finished = recorded is not None and recorded.state == "FINISHED"
    if in_slurm is not None and in_slurm.split()[0] in SLURM_FAILED and not finished:
        log = job_dir / "logs" / "sbatch.log"
        return JobStatus("FAILED", component="job", message=f"Slurm says {in_slurm}",
                         log_tail=log_tail(log), **base)  # fmt: skip
    if ended and job_id is not None:
        return JobStatus("FINISHED", url=recorded.url if recorded else None,
                         message=recorded.message if recorded else None,
                         reason=recorded.reason if recorded else None, **base)  # fmt: skip
    if in_slurm is not None and in_slurm.split()[0].startswith(("PENDING", "REQUEUE")):
        return JobStatus("PENDING", **base)  # queued, or requeued (the last run's file)
    if word == "PENDING" and in_slurm is not None:
        word = "STARTING"  # running, before the script's first write
    return JobStatus(word, url=recorded.url if recorded else None,
                     message=recorded.stage if recorded else None,
                     reason=recorded.reason if recorded else None, **base)  # fmt: skip


def list_logs(job: str) -> list[str]:
    return sorted(path.stem for path in (find_job_dir(job) / "logs").glob("*.log"))


def log_path(job: str, component: str) -> Path:
    path = find_job_dir(job) / "logs" / f"{component}.log"
    if not path.is_file():
        raise JobError(f"no log for {component!r}; there are: {', '.join(list_logs(job))}")
    return path


def job_steps(job_id: str) -> list[str]:
    result = _run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"])
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def cancel(job: str, timeout_s: float = 60.0) -> float:
    """`scancel`, then wait (bounded) until the job and all its steps are gone; seconds taken."""
    job_dir = find_job_dir(job)
    job_id = job_id_of(job_dir)
    if job_id is None:
        raise JobError(f"{job_dir}: no job id recorded (was it submitted?)")
    started = time.monotonic()
    result = _run(["scancel", job_id])
    gone = ("Invalid job id", "already completing or completed")
    if result.returncode != 0 and not any(word in result.stderr for word in gone):
        raise JobError(f"scancel {job_id} failed: {result.stderr.strip()}")
    deadline = started + timeout_s
    while True:
        state = slurm_state(job_id)
        if (state is None or state.split()[0] not in ACTIVE) and not job_steps(job_id):
            break
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {state} after {timeout_s:.0f} s")
        time.sleep(0.2)
    recorded = read_state(job_dir)
    if recorded is not None and recorded.state not in ("FAILED", "FINISHED"):
        write_state(job_dir, "FINISHED", message="cancelled")
    return time.monotonic() - started


def check_submittable(config: DeploymentConfig) -> None:
    """Errors that would only show at job start, raised at submit time (they name the field).

    The model path is checked at job start, on the head: it may exist only on the cluster.
    """
    node_count(config)


def scale(deployment: str, role: str, *, add: int = 0, remove: int = 0) -> list[str]:
    """Add `add` worker-only jobs of `role` to a running deployment, or drain and end its
    newest `remove` ones (`slurm.worker_job`); the job ids submitted or removed."""
    from slurm.worker_job import remove_worker_jobs, submit_worker_jobs

    if bool(add) == bool(remove):
        raise ValueError("give exactly one of add or remove (a positive count)")
    if add:
        return [job.job_id for job in submit_worker_jobs(deployment, role, add)]
    return remove_worker_jobs(deployment, role, remove)

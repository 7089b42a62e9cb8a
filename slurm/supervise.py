"""`python -m slurm.supervise --job-dir DIR NODE...`: the Slurm job's one supervisor call.

The sbatch script runs this on the head node (first of the allocation) after its
environment lines. It slices the allocation and resolves the config (`slurm.job_prepare`),
then runs the same supervisor as `hpcserve up` (`contract.supervisor`) with every component an
srun step (`slurm.srun`): stages in order with readiness checks, restarts under each
component's policy, the ordered stop. Progress and failures go to `<job dir>/state.json`
(`hpcserve status`). The end of the job (time limit warning, preemption, scancel, removal;
see `slurm.lifecycle`) drains the workers first, then stops the rest, and ends FINISHED with
the reason; with `slurm.successor` the next generation is submitted before (`slurm.successor`).
With a `benchmark:` section a sweep runs as one more step once READY (`slurm.benchmark`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from contract.config import ConfigError
from contract.plan import (
    STAGE_FRONTEND,
    STAGE_SERVICES,
    STAGE_WORKERS,
    STOP_TIMEOUT_S,
    PlannedProcess,
)
from contract.processes import ManagedProcess
from contract.readiness import PROBE_ERRORS
from contract.supervisor import DeploymentFailed, Supervisor
from slurm.benchmark import STEP_NAME, benchmark_process, verdict
from slurm.job_prepare import PreparedJob, prepare
from slurm.lifecycle import Ending, termination_reason, warning_reason
from slurm.srun import srun_argv
from slurm.state import write_state
from slurm.successor import successor_plan

logger = logging.getLogger("slurm.supervise")

STAGE_NAMES = {STAGE_SERVICES: "services", STAGE_WORKERS: "workers", STAGE_FRONTEND: "frontend"}
ACTIVE = ("RUNNING", "CONFIGURING")
POLL_S = 0.2
FRONTEND_IDLE_S = 10.0  # after the workers drained: the frontend's last bytes go out


class Interrupted(BaseException):
    """SIGTERM/SIGINT (scancel, the time limit): unwind to the ordered stop."""


def job_ending() -> bool:
    """Slurm already shows the job as ending (COMPLETING, CANCELLED): scancel signals the
    steps and us at once, so a step can be gone before our own SIGTERM arrives."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = result.stdout.strip()
    return result.returncode == 0 and bool(state) and state not in ACTIVE


class SrunStep(ManagedProcess):
    """A component run as an srun step. srun answers SIGTERM by killing its step (SIGKILL
    after KillWait), so a drain signals the step's tasks through scancel instead: each
    worker rank gets SIGTERM, finishes what it holds and exits 0, and srun with it."""

    def terminate(self) -> None:
        step = step_id(self.name)
        if step is None:
            super().terminate()
            return
        subprocess.run(["scancel", "--signal=TERM", step], capture_output=True, timeout=10,
                       check=False)  # fmt: skip


def step_id(step_name: str) -> str | None:
    """The newest step of this job named `step_name` (a restart is a new step)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i %j"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    steps = [line.split()[0] for line in result.stdout.splitlines()
             if len(line.split()) == 2 and line.split()[1] == step_name
             and line.split()[0].rpartition(".")[2].isdigit()]  # fmt: skip
    return max(steps, key=lambda step: int(step.rpartition(".")[2]), default=None)


def srun_launch(job: PreparedJob):
    def launch(process: PlannedProcess) -> ManagedProcess:
        # The step's tasks write to logs/<name>.log (srun --output, appended); srun's own
        # messages ("srun: error: ...") are appended to the same file.
        log = job.job_dir / "logs" / f"{process.name}.log"
        return SrunStep.spawn(process.name, srun_argv(process, job), log)

    return launch


def start_benchmark(job: PreparedJob) -> ManagedProcess:
    """The benchmark step (`slurm.benchmark`), started once the job is READY."""
    step = srun_launch(job)(benchmark_process(job))
    logger.info("benchmark started (pid %s, log %s)", step.pid, step.log_path)
    write_state(job.job_dir, "READY", benchmark="running")
    return step


def benchmark_done(job: PreparedJob, step: ManagedProcess) -> int | None:
    """Record the finished step's verdict. Returns the job's exit code when the job ends here
    (`benchmark.then: exit`: 0 valid, 1 not), None to serve on."""
    assert job.config.benchmark is not None
    result = verdict(step.popen.returncode, job.job_dir)
    logger.info("%s", result.message)
    write_state(job.job_dir, "READY", benchmark=result.word)
    if job.config.benchmark.then == "serve":
        return None
    if result.valid:
        write_state(job.job_dir, "FINISHED", message=result.message)
        return 0
    write_state(job.job_dir, "FAILED", component=STEP_NAME, message=result.message,
                log=str(step.log_path))  # fmt: skip
    return 1


def stop_benchmark(step: ManagedProcess | None) -> None:
    if step is not None and step.running():
        logger.info("stopping the benchmark (exit %s)", step.stop(STOP_TIMEOUT_S))


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def in_flight(frontend_base: str) -> float | None:
    """The frontend's requests in flight (its /metrics gauge); None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{frontend_base}/metrics", timeout=2) as response:
            text = response.read().decode()
    except PROBE_ERRORS:
        return None
    for line in text.splitlines():
        if line.startswith("hpcserve_frontend_requests_in_flight "):
            return float(line.split()[1])
    return None


def wait_frontend_idle(frontend_base: str, deadline: float) -> bool:
    """Until the frontend has sent every response (the workers' last tokens included) out."""
    while True:
        count = in_flight(frontend_base)
        if count is None or count <= 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def drain_and_finish(
    job_dir: Path, supervisor: Supervisor, ending: Ending, frontend_base: str
) -> None:
    """The graceful end: DRAINING (the gateway stops sending here, the frontend routes no new
    request to a draining worker), every worker finishes what it holds, the frontend sends
    the last of it out, then the ordered stop and FINISHED + reason."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # preemption's second SIGTERM: keep draining
    reason = ending.reason or "stopped"
    budget = ending.drain_budget()
    write_state(job_dir, "DRAINING", reason=reason)
    logger.info("ending (%s): draining the workers (at most %.0f s)", reason, budget)
    t0 = time.monotonic()
    left = supervisor.drain_workers(budget)
    idle = not frontend_base or wait_frontend_idle(
        frontend_base, deadline=time.monotonic() + FRONTEND_IDLE_S
    )
    took = time.monotonic() - t0
    if not idle:
        logger.warning("the frontend still had requests in flight %.0f s after the drain",
                       FRONTEND_IDLE_S)  # fmt: skip
    if left:
        message = f"job ended ({reason}); {', '.join(left)} still busy after {took:.0f} s"
    else:
        message = f"job ended ({reason}); workers drained in {took:.1f} s"
    logger.info("%s", message)
    supervisor.stop()
    write_state(job_dir, "FINISHED", reason=reason, message=message)


PrepareJob = Callable[[Path, list[str]], PreparedJob]


def prepare_deployment(job_dir: Path, nodes: list[str]) -> PreparedJob:
    return prepare(job_dir / "deployment.yaml", job_dir, nodes)


def run(
    job_dir: Path, nodes: list[str], prepare_job: PrepareJob = prepare_deployment,
    in_allocation: bool = False,
) -> int:  # fmt: skip
    """Run the job in `job_dir` on `nodes`: a whole deployment, or (`prepare_job` of
    `slurm.worker_job`) worker-only; both end the same way. `in_allocation`: run by
    `hpcserve up --in-allocation`, where SIGINT/SIGTERM come from the user ("stopped")."""
    job_id = os.environ.get("SLURM_JOB_ID")
    write_state(job_dir, "STARTING", job_id=job_id, stage="prepare")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_interrupted)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until `ending` exists
    supervisor: Supervisor | None = None
    ending: Ending | None = None
    bench_step: ManagedProcess | None = None
    try:
        try:
            job = prepare_job(job_dir, nodes)
        except ConfigError as exc:
            logger.error("%s", exc)
            write_state(job_dir, "FAILED", component="prepare", message=str(exc),
                        log=str(job_dir / "logs" / "sbatch.log"))  # fmt: skip
            return 2
        frontend_base = job.url.removesuffix("/v1")  # "" in a worker job: no frontend
        ending = Ending(job.slurm, job_id)
        signal.signal(signal.SIGUSR1,
                      lambda *_: ending.request(warning_reason(job_dir)))  # type: ignore[union-attr]  # fmt: skip

        serving = False

        def record(current: Supervisor) -> None:
            if not ending.requested:  # type: ignore[union-attr]
                write_state(job_dir, "READY" if serving else "STARTING",
                            restarts=current.restarts())  # fmt: skip

        supervisor = Supervisor(job.config, job.plan, srun_launch(job), run_dir=job_dir,
                                say=logger.info, on_change=record, ending=job_ending,
                                on_stage=lambda stage: write_state(
                                    job_dir, "STARTING", stage=STAGE_NAMES[stage]))  # fmt: skip
        supervisor.start()
        serving = True
        ending.learn_end()
        after_ready = successor_plan(job, ending)
        write_state(job_dir, "READY", url=job.url or None)
        print(f"hpcserve ready: {job.url or 'workers registered'}", flush=True)
        if job.config.benchmark is not None and job.url:
            bench_step = start_benchmark(job)
        while supervisor.poll():
            if ending.requested and after_ready.handed_over(ending):
                stop_benchmark(bench_step)
                drain_and_finish(job_dir, supervisor, ending, frontend_base)
                supervisor = None  # stopped
                return 0
            if bench_step is not None and not bench_step.running():
                ended = benchmark_done(job, bench_step)
                bench_step = None
                if ended is not None:
                    return ended
            after_ready.tick(ending)
            time.sleep(POLL_S)
        write_state(job_dir, "FINISHED", message="job ended (its steps were stopped)")
        return 0
    except DeploymentFailed as exc:
        if job_ending():
            write_state(job_dir, "FINISHED", message="job ended")
            return 0
        logger.error("%s", exc)
        write_state(job_dir, "FAILED", component=exc.component, message=str(exc).split("\n")[0],
                    log=str(exc.log_path) if exc.log_path else None)  # fmt: skip
        return 1
    except Interrupted as exc:
        if supervisor is None or ending is None:
            write_state(job_dir, "FINISHED", message=f"job ended ({exc}) before it started")
            return 143
        reason = termination_reason(job_id)
        ending.request("stopped" if in_allocation and reason == "preempted" else reason)
        stop_benchmark(bench_step)
        drain_and_finish(job_dir, supervisor, ending, frontend_base)
        supervisor = None  # stopped
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)  # the ordered stop runs to its end
        stop_benchmark(bench_step)
        if supervisor is not None:
            supervisor.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.supervise", description=__doc__)
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("nodes", nargs="+", help="the allocation, `scontrol show hostnames`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor: %(message)s")  # fmt: skip
    return run(args.job_dir.resolve(), args.nodes)


if __name__ == "__main__":
    raise SystemExit(main())

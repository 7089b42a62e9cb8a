"""`python -m slurm.supervise --job-dir DIR NODE...`: the Slurm job's one supervisor call.

The sbatch script runs this on the head node (first of the allocation) after its
environment lines. It slices the allocation and resolves the config (`slurm.job_prepare`),
then runs the same supervisor as `hpcserve up` (`contract.supervisor`) with every component an
srun step (`slurm.srun`): stages in order with readiness checks, restarts under each
component's policy, the ordered stop. Progress and failures go to `<job dir>/state.json`
(`hpcserve status`). With a `benchmark:` section a sweep runs as one more step once READY
(`slurm.benchmark`). scancel (SIGTERM) stops every step, last stage first, and ends FINISHED.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
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
from contract.supervisor import DeploymentFailed, Supervisor
from slurm.benchmark import STEP_NAME, benchmark_process, verdict
from slurm.job_prepare import PreparedJob, prepare
from slurm.srun import srun_argv
from slurm.state import write_state

logger = logging.getLogger("slurm.supervise")

STAGE_NAMES = {STAGE_SERVICES: "services", STAGE_WORKERS: "workers", STAGE_FRONTEND: "frontend"}
ACTIVE = ("RUNNING", "CONFIGURING")


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


def srun_launch(job: PreparedJob):
    def launch(process: PlannedProcess) -> ManagedProcess:
        # The step's tasks write to logs/<name>.log (srun --output, appended); srun's own
        # messages ("srun: error: ...") are appended to the same file.
        log = job.job_dir / "logs" / f"{process.name}.log"
        return ManagedProcess.spawn(process.name, srun_argv(process, job), log)

    return launch


def run_benchmark(job: PreparedJob, supervisor: Supervisor, step: ManagedProcess) -> int | None:
    """Watch the deployment while the benchmark step runs; then record its verdict. Returns
    the job's exit code when the job ends here (`benchmark.then: exit`, or the job is being
    torn down), None to serve on."""
    assert job.config.benchmark is not None
    logger.info("benchmark started (step %s, log %s)", step.pid, step.log_path)
    write_state(job.job_dir, "READY", benchmark="running")
    while step.running():
        if not supervisor.poll():  # scancel: the job is ending
            write_state(job.job_dir, "FINISHED", message="job ended during the benchmark")
            return 0
        time.sleep(0.2)
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


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(job_dir: Path, nodes: list[str]) -> int:
    job_id = os.environ.get("SLURM_JOB_ID")
    write_state(job_dir, "STARTING", job_id=job_id, stage="prepare")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_interrupted)
    supervisor: Supervisor | None = None
    bench_step: ManagedProcess | None = None
    try:
        try:
            job = prepare(job_dir / "deployment.yaml", job_dir, nodes)
        except ConfigError as exc:
            logger.error("%s", exc)
            write_state(job_dir, "FAILED", component="prepare", message=str(exc),
                        log=str(job_dir / "logs" / "sbatch.log"))  # fmt: skip
            return 2

        serving = False

        def record(current: Supervisor) -> None:
            write_state(job_dir, "READY" if serving else "STARTING",
                        restarts=current.restarts())  # fmt: skip

        supervisor = Supervisor(job.config, job.plan, srun_launch(job), run_dir=job_dir,
                                say=logger.info, on_change=record, ending=job_ending,
                                on_stage=lambda stage: write_state(
                                    job_dir, "STARTING", stage=STAGE_NAMES[stage]))  # fmt: skip
        supervisor.start()
        serving = True
        write_state(job_dir, "READY", url=job.url)
        print(f"hpcserve ready: {job.url}", flush=True)
        if job.config.benchmark is not None:
            bench_step = srun_launch(job)(benchmark_process(job))
            ended = run_benchmark(job, supervisor, bench_step)
            if ended is not None:
                return ended
        supervisor.serve()
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
        write_state(job_dir, "FINISHED", message=f"job ended ({exc})")
        return 143
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # the ordered stop runs to its end
        if bench_step is not None:
            code = bench_step.stop(STOP_TIMEOUT_S)
            logger.info("stopped benchmark (exit %s)", code)
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

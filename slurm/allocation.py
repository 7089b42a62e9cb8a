"""`hpcserve up --in-allocation`: the Slurm job's plan inside an allocation one already holds.

Inside `salloc` (or an sbatch script, or an interactive `srun --pty` shell) SLURM_JOB_ID and
SLURM_JOB_NODELIST name the allocation. This makes a job dir as `hpcserve submit` does
(the config, state file, logs; a generation of the deployment, so `hpcserve status` and
`hpcserve gateway` see it) and runs the job's supervisor (`slurm.supervise.run`) in the
foreground, as one srun step on the head (where it picks the services' ports): every
component an srun step on the allocation's nodes, head first. No new job is submitted.
Ctrl-C or SIGTERM drains the workers and stops it all (FINISHED "stopped"); the allocation
itself stays the caller's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from contract.config import ConfigError, DeploymentConfig
from slurm.jobs import _STEP_VARS, JobError, _record, prepare_job_dir


def allocation_nodes() -> list[str]:
    """The allocation's nodes (`scontrol show hostnames $SLURM_JOB_NODELIST`), head first."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not os.environ.get("SLURM_JOB_ID") or not nodelist:
        raise ConfigError(
            "--in-allocation: not inside a Slurm allocation (no SLURM_JOB_ID / "
            "SLURM_JOB_NODELIST); run it under salloc or in an sbatch script"
        )
    try:
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise JobError("scontrol not found: is Slurm installed here?") from exc
    nodes = result.stdout.split()
    if result.returncode != 0 or not nodes:
        raise JobError(f"scontrol show hostnames {nodelist}: {result.stderr.strip()}")
    return nodes


def run_in_allocation(config: DeploymentConfig) -> int:
    """Run the deployment in the current allocation until it ends or is stopped: the
    supervisor as one srun step on the head (where it picks the services' ports), in the
    foreground; Ctrl-C/SIGTERM here reach it as a drain."""
    from slurm.supervise import step_id

    nodes = allocation_nodes()
    job_id = os.environ["SLURM_JOB_ID"]
    job_dir = prepare_job_dir(config, sys.executable)
    _record(job_dir, job_id, "allocation", config.name)
    step = f"supervisor-{config.name}"
    argv = [
        "srun", f"--job-name={step}", "--overlap", "--mpi=none", "-N1", "-n1",
        f"--nodelist={nodes[0]}", f"--output={job_dir}/logs/sbatch.log", "--open-mode=append",
        sys.executable, "-m", "slurm.allocation", "--job-dir", str(job_dir), *nodes,
    ]  # fmt: skip
    print(f"job {job_id} (this allocation), dir {job_dir}, log {job_dir}/logs/sbatch.log",
          flush=True)  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith(_STEP_VARS)}
    process = subprocess.Popen(argv, env=env, start_new_session=True)

    def drain(_signum: int, _frame: object) -> None:
        # srun would kill its step on SIGTERM: the supervisor gets the signal itself.
        found = step_id(step)
        if found is not None:
            subprocess.run(["scancel", "--signal=TERM", found], check=False, timeout=10)
        else:
            process.terminate()

    previous = {sig: signal.signal(sig, drain) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """The supervisor step on the head: the job's supervisor without the step's variables
    (its srun steps take their shape from their own options, not from this step)."""
    from slurm.supervise import run

    parser = argparse.ArgumentParser(prog="python -m slurm.allocation", description=__doc__)
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("nodes", nargs="+")
    args = parser.parse_args(argv)
    for key in [key for key in os.environ if key.startswith(_STEP_VARS)]:
        del os.environ[key]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor: %(message)s")  # fmt: skip
    return run(args.job_dir.resolve(), args.nodes, in_allocation=True)


if __name__ == "__main__":
    raise SystemExit(main())

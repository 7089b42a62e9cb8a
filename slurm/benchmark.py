"""The benchmark step of a Slurm job: a load sweep against the job's own frontend after READY.

A deployment with a `benchmark:` section (`contract.config.BenchmarkConfig`) runs, once every
component is ready, one more srun step on the head node: `python -m hpcserve bench JOB_DIR
--out JOB_DIR/benchmark`, the same sweep a user runs from outside (the URL from `state.json`,
the workload, model and GPU count from the job's resolved config). It is a command, not an
import: this floor never imports the `hpcserve` command's package. The supervisor keeps
watching (and restarting) the deployment meanwhile. The step's exit code is the verdict:
0 when every point was valid. Then `benchmark.then`: `serve` keeps the deployment up,
`exit` ends the job, FINISHED when the sweep was valid and FAILED naming the benchmark
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contract.plan import STAGE_FRONTEND, PlannedProcess

if TYPE_CHECKING:
    from slurm.job_prepare import PreparedJob

BENCH_DIR = "benchmark"  # <job dir>/benchmark: the run folder (bench.json, .csv, PNGs)
STEP_NAME = "benchmark"


def benchmark_process(job: PreparedJob) -> PlannedProcess:
    """The sweep as one head-node step, run by the Python that runs the frontend (the
    container's inside `slurm.container`)."""
    frontend = next(process for process in job.plan if process.role == "frontend")
    python = frontend.argv[0]
    argv = (python, "-m", "hpcserve", "bench", str(job.job_dir),
            "--out", str(job.job_dir / BENCH_DIR))  # fmt: skip
    return PlannedProcess(STEP_NAME, STEP_NAME, STAGE_FRONTEND + 1, argv, frontend.ready,
                          {"PYTHONUNBUFFERED": "1"})  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """What the finished step means for the job."""

    word: str  # state.json's `benchmark`: valid | invalid (exit N)
    valid: bool
    message: str


def verdict(code: int, job_dir: Path) -> Verdict:
    results = job_dir / BENCH_DIR
    if code == 0:
        return Verdict("valid", True, f"benchmark done, every point valid: {results}")
    log = job_dir / "logs" / f"{STEP_NAME}.log"
    return Verdict(f"invalid (exit {code})", False,
                   f"benchmark exited {code} (an invalid point, or no sweep): see {log} "
                   f"and {results}")  # fmt: skip

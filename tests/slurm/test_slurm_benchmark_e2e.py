"""A deployment whose config has a `benchmark:` section, as a real Slurm job on the namespace
cluster: READY → the sweep runs as a step on the head against the job's own frontend → the
results land in the job dir → `benchmark.then: exit` ends the job FINISHED, nothing left.

Simulated workers (mocker) keep it short: the job's model folder is only the tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import cluster_for_this_process
from test_slurm_e2e import CONFIG, HEAD_URL, hpcserve, submitted, wait_state

from hpcserve.bench.results import load_run
from slurm.state import read_state

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the Slurm test cluster needs root (network namespaces, slurmd as root)",
    ),
]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with cluster_for_this_process(tmp_path_factory, 2) as env:
        yield env


def test_benchmark_step_runs_after_ready_and_ends_the_job(
    slurm_env: dict[str, str], model_dir: Path
) -> None:
    sets = ["engine.kind=mocker", "workers.0.count=1", "engine.mocker.speedup=5",
            "benchmark.concurrency=[2]", "benchmark.requests=6",
            "benchmark.input_tokens.mean=32", "benchmark.output_tokens.mean=8",
            "benchmark.label=slurm-mocker", "benchmark.then=exit"]  # fmt: skip
    with submitted(slurm_env, CONFIG, model_dir, *sets) as (job_id, job_dir):
        status = wait_state(job_id, "FINISHED", timeout_s=420)
        assert status.benchmark == "valid", status.describe()
        run = load_run(job_dir / "benchmark")
        assert run.valid and run.url == HEAD_URL and run.label == "slurm-mocker"
        assert run.gpus == 1 and run.gpus_from == "the deployment's worker ranks"
        [point] = run.points
        assert (point.concurrency, point.completed, point.errors) == (2, 6, 0)
        assert point.output_tokens == 6 * 8  # ignore_eos: exactly the asked length
        for name in ("bench.csv", "pareto.png", "latency.png"):
            assert (job_dir / "benchmark" / name).stat().st_size > 0
        state = read_state(job_dir)
        assert state is not None and state.benchmark == "valid"
        assert "benchmark done, every point valid" in (state.message or "")
        log = hpcserve(slurm_env, "logs", job_id, "benchmark")
        assert "concurrency 2: 6 done, 0 failed" in log
        supervisor = (job_dir / "logs" / "sbatch.log").read_text()
        ready = supervisor.index("frontend ready")
        assert supervisor.index("benchmark started") > ready  # a step after READY
        text = hpcserve(slurm_env, "status", job_id)
        assert text.startswith("FINISHED") and "benchmark: valid" in text
        assert json.loads(hpcserve(slurm_env, "status", job_id, "--json"))["benchmark"] == "valid"

"""The benchmark step of a job: its srun command, and what its exit code does to the job
(state.json, `benchmark.then`). The step is a real process here (a Python exiting with the
verdict's code)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from contract.config import load_config
from contract.processes import ManagedProcess
from slurm.benchmark import benchmark_process
from slurm.state import read_state, write_state
from slurm.steps import placeholder_plan
from slurm.supervise import benchmark_done, stop_benchmark

REPO = Path(__file__).resolve().parents[2]


def job(tmp_path: Path, then: str) -> SimpleNamespace:
    config = load_config(REPO / "configs" / "slurm-agg.yaml",
                         [f"benchmark.then={then}"], environ={})  # fmt: skip
    (tmp_path / "logs").mkdir(exist_ok=True)
    write_state(tmp_path, "READY", url="http://10.99.0.11:8000/v1")
    return SimpleNamespace(config=config, job_dir=tmp_path)


def step(tmp_path: Path, code: int, seconds: float = 0.3) -> ManagedProcess:
    argv = [sys.executable, "-c", f"import time; time.sleep({seconds}); raise SystemExit({code})"]
    return ManagedProcess.spawn("benchmark", argv, tmp_path / "logs" / "benchmark.log")


def test_the_step_is_hpcserve_bench_on_the_head_with_the_frontends_python(tmp_path: Path):
    config = load_config(REPO / "configs" / "slurm-agg.yaml", environ={})
    plan = placeholder_plan(config)
    process = benchmark_process(SimpleNamespace(plan=plan, job_dir=tmp_path))
    frontend = next(p for p in plan if p.role == "frontend")
    assert process.argv == (frontend.argv[0], "-m", "hpcserve", "bench", str(tmp_path),
                            "--out", str(tmp_path / "benchmark"))  # fmt: skip
    assert process.group is None  # a head-node step (srun --overlap -N1 -n1)
    assert process.stage > frontend.stage


@pytest.mark.parametrize(("then", "code", "state", "ends"), [
    ("exit", 0, "FINISHED", 0), ("exit", 1, "FAILED", 1),
    ("serve", 0, "READY", None), ("serve", 1, "READY", None),
])  # fmt: skip
def test_the_verdict_and_then(tmp_path: Path, then: str, code: int, state: str, ends) -> None:
    finished = step(tmp_path, code)
    finished.popen.wait(30)
    result = benchmark_done(job(tmp_path, then), finished)
    assert result == ends
    recorded = read_state(tmp_path)
    assert recorded is not None and recorded.state == state
    assert recorded.benchmark == ("valid" if code == 0 else f"invalid (exit {code})")
    assert recorded.url == "http://10.99.0.11:8000/v1"
    if state == "FAILED":
        assert recorded.component == "benchmark"
        assert recorded.log == str(tmp_path / "logs" / "benchmark.log")
        assert "benchmark exited 1" in (recorded.message or "")


def test_a_running_step_is_stopped(tmp_path: Path) -> None:
    running = step(tmp_path, 0, seconds=60)
    stop_benchmark(running)
    assert not running.running()
    stop_benchmark(None)  # no step: nothing to do

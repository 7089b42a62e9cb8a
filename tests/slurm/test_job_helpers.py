"""The job's helpers without Slurm: state file, the run-time plan and its srun commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from slurm.job_prepare import prepare
from slurm.srun import srun_argv
from slurm.state import read_state, write_state


def test_state_keeps_job_id_and_first_failure(tmp_path: Path) -> None:
    write_state(tmp_path, "STARTING", job_id="7")
    write_state(tmp_path, "FAILED", component="worker-agg-g0-i0", log="/x.log")
    write_state(tmp_path, "FINISHED")  # the exit trap: the failure stays
    state = read_state(tmp_path)
    assert state is not None
    assert (state.state, state.job_id, state.component) == ("FAILED", "7", "worker-agg-g0-i0")


def test_state_cli_writes_ready_url(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "slurm.state", str(tmp_path), "READY", "--url", "http://h:1/v1"],
        check=True,
    )
    state = read_state(tmp_path)
    assert state is not None and (state.state, state.url) == ("READY", "http://h:1/v1")


def test_state_keeps_restart_counts(tmp_path: Path) -> None:
    write_state(tmp_path, "READY", url="http://h:1/v1", restarts={"worker-agg-g0-i0": 2})
    write_state(tmp_path, "FINISHED", message="job ended")
    state = read_state(tmp_path)
    assert state is not None
    assert (state.state, state.url, state.restarts) == (
        "FINISHED", "http://h:1/v1", {"worker-agg-g0-i0": 2}
    )


def test_prepare_writes_resolved_config_and_plan(tmp_path: Path) -> None:
    config = {
        "name": "t",
        "engine": {"kind": "mocker"},
        "workers": [{"count": 2, "per_process": 1}],
        "frontend": {"host": "0.0.0.0", "port": 0},
        "slurm": {"ranks_per_node": 1},
    }
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(config))
    job = prepare(tmp_path / "deployment.yaml", tmp_path, ["localhost", "w1", "w2"])
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["services"]["etcd"]["endpoint"].startswith("http://127.0.0.1:")
    assert resolved["run_dir"] == str(tmp_path)
    assert job.slicing.head == "localhost"
    steps = {process.name: srun_argv(process, job) for process in job.plan}
    worker = steps["worker-agg-g0-i1"]
    assert worker[:4] == ["srun", "--job-name=worker-agg-g0-i1",
                          f"--output={tmp_path}/logs/worker-agg-g0-i1.log", "--open-mode=append"]
    assert "--nodelist=w2" in worker and "--ntasks=1" in worker and "--mpi=pmix" in worker
    index = worker.index(sys.executable)
    assert worker[index + 1 :] == [
        "-m", "mpi_workers", "--config", f"{tmp_path}/config.yaml", "--group", "0", "--index", "1",
    ]  # fmt: skip
    frontend = steps["frontend"]
    assert "--nodelist=localhost" in frontend and "--overlap" in frontend
    assert frontend[-4:] == ["-m", "frontend", "--config", f"{tmp_path}/config.yaml"]
    assert job.url.startswith("http://127.0.0.1:") and job.url.endswith("/v1")


def test_simulated_workers_hosted_together_are_one_srun_step_each_process(tmp_path: Path):
    """Five mocker workers, four per process: two srun steps (one task each) on two worker
    nodes, the first hosting i0..i3, the second i4."""
    config = {
        "name": "t",
        "engine": {"kind": "mocker"},
        "workers": [{"count": 5, "per_process": 4}],
        "frontend": {"host": "0.0.0.0", "port": 0},
        "slurm": {"ranks_per_node": 1},
    }
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(config))
    job = prepare(tmp_path / "deployment.yaml", tmp_path, ["localhost", "w1", "w2"])
    workers = [process for process in job.plan if process.group is not None]
    assert [p.name for p in workers] == ["worker-agg-g0-i0-3", "worker-agg-g0-i4"]
    assert [g.name for g in job.slicing.groups] == [p.name for p in workers]
    assert workers[0].worker_ids == tuple(f"agg-g0-i{i}" for i in range(4))
    step = srun_argv(workers[0], job)
    assert "--job-name=worker-agg-g0-i0-3" in step and "--ntasks=1" in step
    assert step[-4:] == ["--index", "0", "--instances", "4"]
    assert srun_argv(workers[1], job)[-2:] == ["--index", "4"]

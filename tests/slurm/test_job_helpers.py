"""The job script's helpers without Slurm: state file, readiness wait, run-time plan."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from slurm import wait_ready
from slurm.job_prepare import prepare
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


def test_wait_ready_port_and_dead_step(capsys) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert wait_ready.main(["--port", f"127.0.0.1:{port}", "--timeout", "5"]) == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    code = wait_ready.main(
        ["--url", "http://127.0.0.1:1/health", "--timeout", "5", "--watch", f"w1={dead.pid}"]
    )
    assert code == wait_ready.EXIT_STEP_DIED
    assert capsys.readouterr().out.strip() == "w1"
    assert wait_ready.main(["--port", "127.0.0.1:1", "--timeout", "0.3"]) == wait_ready.EXIT_TIMEOUT


def test_prepare_writes_resolved_config_and_plan(tmp_path: Path) -> None:
    config = {
        "name": "t",
        "engine": {"kind": "mocker"},
        "workers": [{"count": 2}],
        "frontend": {"host": "0.0.0.0", "port": 0},
        "slurm": {"ranks_per_node": 1},
    }
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "plan.sh"
    prepare(tmp_path / "deployment.yaml", tmp_path, ["localhost", "w1", "w2"], out)
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["services"]["etcd"]["endpoint"].startswith("http://127.0.0.1:")
    assert resolved["run_dir"] == str(tmp_path)
    script = f"set -eu; source {out}; " + (
        'echo "$HEAD $NODES_worker_agg_g0_i0 $NODES_worker_agg_g0_i1 $NTASKS_worker_agg_g0_i1";'
        ' echo "${ARGV_worker_agg_g0_i1[@]:1}"; echo "${READY_frontend[@]}"'
    )
    lines = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                           check=True).stdout.splitlines()  # fmt: skip
    assert lines[0] == "localhost w1 w2 1"
    assert lines[1] == f"-m mpi_workers --config {tmp_path}/config.yaml --group 0 --index 1"
    assert lines[2].startswith("--url http://127.0.0.1:")
    assert lines[2].endswith("/health --timeout 180")

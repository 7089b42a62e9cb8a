"""`hpcserve up` when something goes wrong: a child dies, the config is bad."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner
from up_helpers import UpProcess, processes_mentioning

from hpcserve.cli import app
from slurm.wait_ready import pid_alive


@pytest.mark.slow
def test_a_dying_worker_stops_the_deployment(tmp_path: Path) -> None:
    up = UpProcess(["configs/local-agg.yaml", "--set", "frontend.port=0"], tmp_path / "run")
    try:
        up.wait_ready(timeout_s=300)
        pids = up.pids()
        os.kill(pids["worker-agg-g0-i0"], signal.SIGKILL)
        code = up.finish(timeout_s=90)
    finally:
        up.kill_all()
    assert code == 1, up.output
    assert re.search(r"worker-agg-g0-i0 exited with code -9", up.output), up.output
    assert "registered agg-g0-i0" in up.output  # the dead worker's log tail is shown
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert processes_mentioning(str(tmp_path / "run")) == []


def test_config_errors_exit_2_naming_the_field(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["up", "--set", "frontend.port=-1"])
    assert result.exit_code == 2
    assert "frontend.port" in result.output
    result = runner.invoke(app, ["config", "show", "--set", "engine.block_size=0"])
    assert result.exit_code == 2
    assert "engine.block_size" in result.output
    result = runner.invoke(
        app, ["up", "--set", f"model.path={tmp_path}", "--set", f"run_dir={tmp_path / 'r'}"]
    )
    assert result.exit_code == 2
    assert "model.path" in result.output
    result = runner.invoke(app, ["up", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "missing.yaml" in result.output


def test_config_show_and_plan(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["config", "show", "--set", "frontend.port=9"], env={"HPCSERVE__NAME": "fromenv"}
    )
    assert result.exit_code == 0, result.output
    assert "name: fromenv" in result.output
    assert "port: 9" in result.output
    result = runner.invoke(app, ["plan"])
    assert result.exit_code == 0, result.output
    worker = "python3 -m mpi_workers --config RUN_DIR/config.yaml --group 0 --index 0"
    assert worker in result.output
    assert "[stage 2] frontend" in result.output


def test_a_busy_frontend_port_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            app, ["up", "--set", f"frontend.port={port}", "--set", f"run_dir={tmp_path}"]
        )
    assert result.exit_code == 2
    assert "frontend.port" in result.output and "in use" in result.output


def test_model_prepare_is_idempotent(model_dir: Path) -> None:
    result = CliRunner().invoke(app, ["model", "prepare"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(model_dir)
    assert oct(model_dir.stat().st_mode & 0o777) == oct(0o755)

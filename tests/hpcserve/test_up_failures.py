"""`hpcserve up` when something goes wrong: a child dies, the config is bad."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner
from up_helpers import UpProcess, openai_client, processes_mentioning

from contract.processes import pid_alive
from hpcserve.cli import app


@pytest.mark.e2e
def test_a_crashed_worker_is_restarted_and_serves_again(tmp_path: Path) -> None:
    """Real model: kill -9 the only worker; the supervisor starts it again (its key dropped
    at once), it registers anew, and the next request is answered. SIGTERM then stops all."""
    args = ["configs/local-agg.yaml", "--set", "frontend.port=0",
            "--set", "workers.0.restart.backoff_s=0.2"]  # fmt: skip
    up = UpProcess(args, tmp_path / "run")
    try:
        up.base_url = up.wait_ready(timeout_s=300)
        old = up.pids()["worker-agg-g0-i0"]
        os.kill(old, signal.SIGKILL)
        up.wait_for_line(re.compile(r"worker-agg-g0-i0 exited with code -9; restart 1 of 3"), 30)
        up.wait_for_line(re.compile(r"worker-agg-g0-i0 is back \(restart 1\)"), 300)
        assert up.pids()["worker-agg-g0-i0"] != old
        client = openai_client(up)
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=20,
        )  # fmt: skip
        assert "Paris" in (answer.choices[0].message.content or "")
        metrics = urllib.request.urlopen(up.base_url.removesuffix("/v1") + "/metrics").read()
        assert b'hpcserve_component_restarts_total{component="worker-agg-g0-i0"} 1.0' in metrics
        pids = up.pids()
        up.popen.send_signal(signal.SIGTERM)
        assert up.finish(timeout_s=90) == 0, up.output
    finally:
        up.kill_all()
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert processes_mentioning(str(tmp_path / "run")) == []


@pytest.mark.e2e
def test_a_critical_worker_out_of_restarts_stops_the_deployment(tmp_path: Path) -> None:
    args = ["configs/local-mocker-kv.yaml", "--set", "frontend.port=0", "--set",
            "workers.0.count=2", "--set", "workers.0.restart.max_restarts=0",
            "--set", "workers.0.per_process=1"]  # fmt: skip
    up = UpProcess(args, tmp_path / "run")
    try:
        up.wait_ready(timeout_s=300)
        pids = up.pids()
        os.kill(pids["worker-agg-g0-i0"], signal.SIGKILL)
        code = up.finish(timeout_s=90)
    finally:
        up.kill_all()
    assert code == 1, up.output
    assert re.search(r"worker-agg-g0-i0 exited with code -9; no restarts left", up.output)
    assert "registered agg-g0-i0" in up.output  # the dead worker's log tail is shown
    assert "worker-agg-g0-i0 is critical; stopping all" in up.output
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert processes_mentioning(str(tmp_path / "run")) == []


@pytest.mark.e2e
def test_drained_worker_leaves_and_is_not_restarted(tmp_path: Path) -> None:
    args = ["configs/local-mocker-kv.yaml", "--set", "frontend.port=0", "--set",
            "workers.0.count=2", "--set", "workers.0.per_process=1"]  # fmt: skip
    up = UpProcess(args, tmp_path / "run")
    try:
        up.base_url = up.wait_ready(timeout_s=300)
        pid = up.pids()["worker-agg-g0-i1"]
        runner = CliRunner()
        result = runner.invoke(app, ["drain", str(tmp_path / "run"), "worker-agg-g0-nope"])
        assert result.exit_code == 2 and "worker-agg-g0-i1" in result.output
        result = runner.invoke(app, ["drain", str(tmp_path / "run"), "worker-agg-g0-i1"])
        assert result.exit_code == 0, result.output
        up.wait_for_line(re.compile(r"worker-agg-g0-i1 drained and left \(exit 0\)"), 60)
        assert not pid_alive(pid)
        client = openai_client(up)
        model = client.models.list().data[0].id
        for _ in range(3):  # the other worker serves on
            answer = client.completions.create(model=model, prompt="Hello", max_tokens=4)
            assert answer.choices[0].finish_reason in ("length", "stop")
        assert up.popen.poll() is None and "restart 1 of" not in up.output
        up.popen.send_signal(signal.SIGTERM)
        assert up.finish(timeout_s=90) == 0, up.output
    finally:
        up.kill_all()
    assert processes_mentioning(str(tmp_path / "run")) == []


@pytest.mark.e2e
@pytest.mark.parametrize("service", ["etcd", "nats"])
def test_service_restarted_by_the_supervisor_while_serving(tmp_path: Path, service: str) -> None:
    """kill -9 etcd (or NATS) under load: the supervisor starts it again (etcd on its data);
    workers and frontend reconnect by themselves; requests keep being answered throughout
    and both workers are registered afterwards."""
    import threading

    import yaml

    from contract.discovery import workers_prefix
    from contract.readiness import etcd_key_count

    args = ["configs/local-mocker-kv.yaml", "--set", "frontend.port=0", "--set",
            "workers.0.count=2", "--set", "engine.mocker.speedup=20",
            "--set", "workers.0.per_process=1"]  # fmt: skip
    up = UpProcess(args, tmp_path / "run")
    outcomes: list[str] = []
    stop = threading.Event()
    try:
        up.base_url = up.wait_ready(timeout_s=300)
        client = openai_client(up, timeout=60)
        model = client.models.list().data[0].id

        def load() -> None:
            while not stop.is_set():
                try:
                    answer = client.completions.create(model=model, prompt="Hello there",
                                                       max_tokens=16)  # fmt: skip
                    outcomes.append(answer.choices[0].finish_reason or "none")
                except Exception as exc:  # recorded: the test fails on any
                    outcomes.append(f"error: {exc!r}")

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(outcomes) >= 8)
        os.killpg(up.pids()[service], signal.SIGKILL)
        up.wait_for_line(re.compile(rf"{service} exited with code -9; restart 1 of 3"), 30)
        up.wait_for_line(re.compile(rf"{service} is back \(restart 1\)"), 60)
        done = len(outcomes)
        wait_until(lambda: len(outcomes) >= done + 16)
        stop.set()
        for thread in threads:
            thread.join(60)
        config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        endpoint = config["services"]["etcd"]["endpoint"]
        wait_until(lambda: etcd_key_count(endpoint, workers_prefix(config["name"])) == 2)
        up.popen.send_signal(signal.SIGTERM)
        assert up.finish(timeout_s=90) == 0, up.output
    finally:
        stop.set()
        up.kill_all()
    assert [o for o in outcomes if o.startswith("error")] == [], outcomes
    assert set(outcomes) <= {"length", "stop"}


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


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
    assert result.output.splitlines()[-1] == "1 worker(s) in 1 process(es)"
    result = runner.invoke(app, ["plan", "configs/local-mocker-kv.yaml",
                                 "--set", "workers.0.count=6"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "[stage 1] worker-agg-g0-i0-3 (agg)" in result.output
    assert "hosts 2 workers: agg-g0-i4, agg-g0-i5" in result.output
    assert "ready when 6 key(s) under hpcserve/local-mocker-kv/workers/" in result.output
    assert result.output.splitlines()[-1] == "6 worker(s) in 2 process(es)"


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

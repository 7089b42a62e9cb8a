"""`hpcserve up` with `engine.kind: trtllm`, up to the plan (no engine needed): which groups
need `mpirun` and `trtllm-llmapi-launch`, and the error when the launcher is missing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contract.config import ConfigError, load_config
from contract.plan import TRTLLM_LAUNCHER
from hpcserve.cli import app
from hpcserve.launcher import mpi_launcher, prepare_deployment

REPO = Path(__file__).resolve().parents[2]
AGG = REPO / "configs" / "local-trtllm-agg.yaml"


def quiet(_message: str) -> None:
    pass


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """PATH without trtllm-llmapi-launch (mpirun comes from beside our Python)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def fake_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A trtllm-llmapi-launch on PATH (never run here: the plan only names it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / TRTLLM_LAUNCHER
    script.write_text('#!/usr/bin/env bash\nset -euo pipefail\nexec "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return script


def config(model_dir: Path, run_dir: Path, *overrides: str):
    sets = [f"model.path={model_dir}", f"run_dir={run_dir}", "frontend.port=0", *overrides]
    return load_config(AGG, sets, environ={})


def worker_argv(deployment) -> tuple[str, ...]:
    return next(p.argv for p in deployment.plan if p.group is not None)


def test_missing_launcher_is_a_config_error(no_launcher: None, tmp_path: Path) -> None:
    deployment = load_config(AGG, ["workers.0.tp=2"], environ={})
    with pytest.raises(ConfigError) as info:
        prepare_deployment(deployment, quiet)
    message = str(info.value)
    assert message.startswith(
        "engine.kind trtllm: trtllm-llmapi-launch is not on PATH: run inside NVIDIA's "
        "TensorRT-LLM container or `pip install tensorrt_llm` from NVIDIA's index"
    )
    assert "workers.0" in message


def test_cli_up_names_the_missing_launcher(no_launcher: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["up", str(AGG), "--set", "workers.0.tp=2", "--set", f"run_dir={tmp_path / 'r'}"]
    )
    assert result.exit_code == 2, result.output
    assert "trtllm-llmapi-launch is not on PATH" in result.output
    assert not (tmp_path / "r").exists()  # refused before anything was made


@pytest.mark.parametrize(
    "overrides",
    [("workers.0.tp=1",), ("workers.0.tp=2", "engine.trtllm.launch=spawn")],
    ids=["one-rank", "spawn"],
)
def test_single_process_groups_need_no_launcher(
    no_launcher: None, model_dir: Path, tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    deployment = prepare_deployment(config(model_dir, tmp_path / "run", *overrides), quiet)
    argv = worker_argv(deployment)
    assert argv[:3] == (sys.executable, "-m", "mpi_workers")
    assert TRTLLM_LAUNCHER not in argv


def test_multi_rank_group_runs_mpirun_over_the_launcher(
    fake_launcher: Path, model_dir: Path, tmp_path: Path
) -> None:
    """tp 2 x pp 2: `mpirun ... -n 4 trtllm-llmapi-launch python -m mpi_workers ...`."""
    run_dir = tmp_path / "run"
    overrides = ("workers.0.tp=2", "engine.trtllm.pipeline_parallel_size=2")
    deployment = prepare_deployment(config(model_dir, run_dir, *overrides), quiet)
    prefix = mpi_launcher()
    config_file = str(run_dir.resolve() / "config.yaml")
    assert worker_argv(deployment) == (
        *prefix, "-n", "4", TRTLLM_LAUNCHER, sys.executable, "-m", "mpi_workers",
        "--config", config_file, "--group", "0", "--index", "0",
    )  # fmt: skip
    # The written config keeps the engine YAML, made absolute beside the shipped config.
    written = load_config(config_file, environ={})
    assert written.engine.trtllm.extra_engine_args == str(
        REPO / "configs" / "engine_configs" / "agg.yaml"
    )

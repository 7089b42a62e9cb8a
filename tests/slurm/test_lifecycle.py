"""The end of a job without Slurm: reasons, drain budgets, the successor's config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from contract.config import ConfigError, load_config
from contract.slurm_config import SlurmConfig
from slurm.lifecycle import REMOVE_FILE, Ending, strip_job_env, warning_reason
from slurm.render import render_script
from slurm.successor import successor_config


def test_usr1_means_time_limit_unless_a_removal_was_asked(tmp_path: Path) -> None:
    assert warning_reason(tmp_path) == "time limit"
    (tmp_path / REMOVE_FILE).touch()
    assert warning_reason(tmp_path) == "removed"


def test_drain_budget_and_handover_deadline_follow_the_end() -> None:
    ending = Ending(SlurmConfig(time_limit=10, drain_s=60), job_id=None)
    ending.end = time.time() + 50
    assert ending.handover_deadline() == pytest.approx(ending.end - 30)
    assert 29 <= ending.drain_budget() <= 30  # half of drain_s, within the time left
    ending.end = time.time() + 8
    assert ending.drain_budget() == pytest.approx(5.0, abs=1.0)  # never below the minimum
    ending.request("preempted")
    ending.request("time limit")  # the first reason stays
    assert ending.reason == "preempted"


def test_sbatch_asks_for_the_warning_signal() -> None:
    config = load_config(None, ["slurm.time_limit=5", "slurm.drain_s=45"], environ={})
    assert "#SBATCH --signal=B:USR1@45\n" in render_script(config, job_dir="/j", python="/p")


def test_successor_needs_a_time_limit() -> None:
    with pytest.raises(ConfigError, match=r"slurm\.successor: needs slurm\.time_limit"):
        load_config(None, ["slurm.successor=true"], environ={})


def test_successor_config_is_the_submitted_one_in_a_fresh_dir(tmp_path: Path) -> None:
    submitted = {"name": "svc", "run_dir": str(tmp_path), "engine": {"kind": "mocker"},
                 "slurm": {"time_limit": 3, "successor": True, "successor_lead_s": 90}}  # fmt: skip
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(submitted))
    config = successor_config(tmp_path)
    assert config.run_dir is None
    assert config.slurm is not None and config.slurm.successor_lead_s == 90
    assert config.name == "svc"


def test_job_env_is_dropped_for_another_job() -> None:
    env = strip_job_env({"SLURM_JOB_ID": "3", "SLURM_CONF": "/c", "SBATCH_X": "1", "PATH": "/b"})
    assert env == {"SLURM_CONF": "/c", "PATH": "/b"}


def test_up_in_allocation_outside_one_says_so() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        [sys.executable, "-m", "hpcserve", "up", "--in-allocation", "configs/slurm-mocker.yaml"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--in-allocation: not inside a Slurm allocation" in result.stderr

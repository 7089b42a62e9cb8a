"""The sbatch script rendered from `configs/slurm-*.yaml` (golden files) and its config errors.

Regenerate the golden files after an intended change, then review the diff:

    HPCSERVE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/slurm/test_render.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import model_validator

from contract.config import ConfigError, DeploymentConfig, load_config
from slurm.jobs import submitit_parameters
from slurm.render import render_script, sbatch_lines

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
JOB_DIR = "/jobs/JOB"
PYTHON = "/opt/hpcserve/.venv/bin/python"


class FutureConfig(DeploymentConfig):
    """The schema as it will be once TP lands: tp > 1 accepted (its rendering is ready now)."""

    @model_validator(mode="after")
    def _only_agg_for_now(self) -> FutureConfig:
        return self


def load(name: str) -> DeploymentConfig:
    path = REPO / "configs" / f"{name}.yaml"
    if name == "slurm-tp-multinode":
        return FutureConfig.model_validate(yaml.safe_load(path.read_text()))
    return load_config(path, environ={})


@pytest.mark.parametrize("name", ["slurm-agg", "slurm-multi", "slurm-tp-multinode", "slurm-disagg"])
def test_golden(name: str) -> None:
    text = render_script(load(name), job_dir=JOB_DIR, python=PYTHON)
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("HPCSERVE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden} differs; see this module's docstring"


@pytest.mark.parametrize("name", ["slurm-agg", "slurm-multi", "slurm-tp-multinode", "slurm-disagg"])
def test_script_is_valid_bash(name: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(render_script(load(name), job_dir=JOB_DIR, python=PYTHON))
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_tp_group_is_one_step_of_tp_ranks() -> None:
    text = render_script(load("slurm-tp-multinode"), job_dir=JOB_DIR, python=PYTHON)
    assert "#SBATCH --nodes=5" in text  # head + 2 groups x 2 nodes of 4 GPUs
    assert "#SBATCH --ntasks-per-node=4" in text
    assert text.count("launch 1 worker-") == 2
    assert "--mpi=pmix" in text


def test_header_derives_nodes_and_keeps_given_ones() -> None:
    config = load_config(REPO / "configs" / "slurm-agg.yaml", environ={})
    assert "#SBATCH --nodes=3" in sbatch_lines(config, JOB_DIR)
    more = load_config(REPO / "configs" / "slurm-agg.yaml", ["slurm.nodes=5"], environ={})
    assert "#SBATCH --nodes=5" in sbatch_lines(more, JOB_DIR)
    assert f"#SBATCH --output={JOB_DIR}/logs/sbatch.log" in sbatch_lines(config, JOB_DIR)


def test_too_few_nodes_names_the_field() -> None:
    config = load_config(REPO / "configs" / "slurm-agg.yaml", ["slurm.nodes=2"], environ={})
    with pytest.raises(ConfigError, match=r"slurm\.nodes"):
        render_script(config, job_dir=JOB_DIR, python=PYTHON)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("slurm.time_limit=abc", "slurm.time_limit"),
        ("slurm.mpi_plugin=openmpi", "slurm.mpi_plugin"),
        ("slurm.container.image=", "slurm.container.image"),
        ("slurm.partition=has space", "slurm.partition"),
    ],
)
def test_cli_config_errors_name_the_field(override: str, field: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hpcserve", "render", "configs/slurm-agg.yaml", "--set", override],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert field in result.stderr


def test_cli_render_prints_the_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hpcserve", "render", "configs/slurm-agg.yaml", "--job-dir", "/j"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/usr/bin/env bash\n#SBATCH --job-name=slurm-agg\n")


def test_submitit_parameters_match_the_header() -> None:
    params = submitit_parameters(load("slurm-multi"))
    assert params["nodes"] == 2 and params["tasks_per_node"] == 8
    assert params["timeout_min"] == 240
    assert params["slurm_srun_args"] == ["--nodes=1", "--ntasks=1"]
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 8
    extra = params["slurm_additional_parameters"]
    assert extra["account"] == "llm-serving" and extra["exclusive"] is True
    assert extra["mail-type"] == "END"
    # No time limit in the config: not submitit's 5-minute default.
    agg = load_config(REPO / "configs" / "slurm-agg.yaml", ["slurm.time_limit=null"], environ={})
    assert submitit_parameters(agg)["timeout_min"] == 60

"""The sbatch script rendered from `configs/slurm-*.yaml` (golden files) and its config errors.

Regenerate the golden files after an intended change, then review the diff:

    HPCSERVE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/slurm/test_render.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import model_validator

from contract.config import ConfigError, DeploymentConfig, load_config
from slurm.job_prepare import PreparedJob
from slurm.jobs import submitit_parameters
from slurm.render import render_script, sbatch_lines, slurm_options
from slurm.slicing import slice_nodes
from slurm.srun import container_options, srun_argv
from slurm.steps import group_needs, placeholder_plan

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


def srun_steps(config: DeploymentConfig, nodes: int) -> dict[str, list[str]]:
    """The srun command of every component as the job's supervisor would build it, on an
    allocation of `nodes` nodes (n0 the head)."""
    slurm = slurm_options(config)
    slicing = slice_nodes(
        [f"n{i}" for i in range(nodes)], group_needs(config), gpus_per_node=slurm.gpus_per_node,
        head_hosts_workers=slurm.head_hosts_workers, ranks_per_node=slurm.ranks_per_node,
    )  # fmt: skip
    plan = placeholder_plan(config)
    job = PreparedJob(config, plan, slicing, "10.0.0.1", "http://10.0.0.1:8000/v1", Path(JOB_DIR))
    return {process.name: srun_argv(process, job) for process in plan}


GOLDEN_CONFIGS = [
    "slurm-agg", "slurm-multi", "slurm-tp-multinode", "slurm-disagg",
    "slurm-trtllm-agg", "slurm-trtllm-disagg", "slurm-trtllm-llama4-eagle",
]  # fmt: skip


@pytest.mark.parametrize("name", GOLDEN_CONFIGS)
def test_golden(name: str) -> None:
    text = render_script(load(name), job_dir=JOB_DIR, python=PYTHON)
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("HPCSERVE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden} differs; see this module's docstring"


@pytest.mark.parametrize("name", GOLDEN_CONFIGS)
def test_script_is_valid_bash(name: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(render_script(load(name), job_dir=JOB_DIR, python=PYTHON))
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_tp_group_is_one_step_of_tp_ranks() -> None:
    config = load("slurm-tp-multinode")
    text = render_script(config, job_dir=JOB_DIR, python=PYTHON)
    assert "#SBATCH --nodes=5" in text  # head + 2 groups x 2 nodes of 4 GPUs
    assert "#SBATCH --ntasks-per-node=4" in text
    assert 'exec "$PYTHON" -m slurm.supervise --job-dir "$JOB_DIR" "${NODES[@]}"' in text
    workers = [argv for name, argv in srun_steps(config, 5).items() if name.startswith("worker")]
    assert len(workers) == 2
    for argv in workers:
        assert {"--mpi=pmix", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4"} <= set(argv)


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


def test_trtllm_group_is_one_step_of_tp_times_pp_ranks() -> None:
    """tp 8 x pp 2: one srun step of 16 tasks over two 8-GPU nodes; the head shares node 1."""
    config = load("slurm-trtllm-agg")
    assert [need.ranks for need in group_needs(config)] == [16]
    text = render_script(config, job_dir=JOB_DIR, python=PYTHON)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=8" in text
    argv = srun_steps(config, 2)["worker-agg-g0-i0"]
    assert {"--mpi=pmix", "--nodes=2", "--ntasks=16", "--gpus-per-node=8"} <= set(argv)


def test_trtllm_disagg_steps_carry_the_ucx_env() -> None:
    config = load("slurm-trtllm-disagg")
    steps = srun_steps(config, 2).values()
    assert sum("--export=ALL,PYTHONUNBUFFERED=1,TRTLLM_USE_UCX_KVCACHE=1" in a for a in steps) == 3
    text = render_script(config, job_dir=JOB_DIR, python=PYTHON)
    assert "#SBATCH --nodes=2" in text  # 2 prefill x TP4 on one node, decode TP8 on the other


def test_mpi_plugin_is_one_rule_for_every_engine() -> None:
    """Worker steps take `slurm.mpi_plugin` (default pmix), TensorRT-LLM's like the others."""
    config = load_config(
        REPO / "configs" / "slurm-trtllm-agg.yaml", ["slurm.mpi_plugin=pmi2"], environ={}
    )
    steps = srun_steps(config, 2)
    assert "--mpi=pmi2" in steps["worker-agg-g0-i0"]
    assert all("--mpi=pmix" not in argv for argv in steps.values())
    assert "--mpi=none" in steps["frontend"]  # the head's one-task steps need no MPI


def test_trtllm_spawn_is_refused_under_slurm() -> None:
    config = load_config(
        REPO / "configs" / "slurm-trtllm-agg.yaml", ["engine.trtllm.launch=spawn"], environ={}
    )
    with pytest.raises(ConfigError, match=r"engine\.trtllm\.launch: spawn .*workers\.0.*16 ranks"):
        render_script(config, job_dir=JOB_DIR, python=PYTHON)
    one_rank = load_config(
        REPO / "configs" / "slurm-trtllm-agg.yaml",
        ["engine.trtllm.launch=spawn", "workers.0.tp=1", "engine.trtllm.pipeline_parallel_size=1"],
        environ={},
    )
    render_script(one_rank, job_dir=JOB_DIR, python=PYTHON)  # one process: nothing to spawn


def test_container_flags() -> None:
    config = load_config(
        REPO / "configs" / "slurm-multi.yaml",
        ["slurm.container.env=[HF_TOKEN,NCCL_DEBUG]", "slurm.container.mount_home=true",
         "slurm.container.entrypoint=true"],
        environ={},
    )  # fmt: skip
    assert config.slurm is not None
    assert container_options(config.slurm, JOB_DIR) == [
        "--container-image=nvcr.io#nvidia/pytorch:24.05-py3",
        f"--container-mounts=/models:/models:ro,/scratch:/scratch,{JOB_DIR}:{JOB_DIR}",
        "--container-workdir=/scratch",
        "--container-env=HF_TOKEN,NCCL_DEBUG",
        "--container-mount-home",
        "--container-entrypoint",
    ]
    multi = load("slurm-multi")
    steps = srun_steps(multi, 4)
    # Defaults, on every step (head and workers alike), as srt-slurm renders them.
    assert len(steps) == 9
    for argv in steps.values():
        assert "--no-container-mount-home" in argv and "--no-container-entrypoint" in argv
    with pytest.raises(ConfigError, match="run_dir"):
        container_options(config.slurm, "/jobs/a,b")
    with pytest.raises(ConfigError, match="run_dir"):
        render_script(multi, job_dir="/jobs/a:b", python=PYTHON)


def test_job_prepare_trtllm_in_a_container(tmp_path: Path) -> None:
    """At job start: 2 x 2 ranks per step under trtllm-llmapi-launch, the image's python3 and
    service binaries, the engine YAMLs copied into the job dir, the model path the container's."""
    from slurm.job_prepare import prepare

    config = load_config(
        REPO / "configs" / "slurm-trtllm-disagg.yaml",
        ["workers.0.count=1", "workers.0.tp=2", "workers.1.tp=2", "slurm.gpus_per_node=2",
         "engine.trtllm.gpus_per_node=2"],
        environ={},
    )  # fmt: skip
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    job = prepare(tmp_path / "deployment.yaml", tmp_path, ["localhost", "w1"])
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    copies = [group["engine_args"] for group in resolved["workers"]]
    assert copies == [
        str(tmp_path / "engine_configs" / "group0-prefill.yaml"),
        str(tmp_path / "engine_configs" / "group1-decode.yaml"),
    ]
    assert (tmp_path / "engine_configs" / "group1-decode.yaml").read_text() == (
        REPO / "configs" / "engine_configs" / "decode.yaml"
    ).read_text()
    argv = {process.name: process.argv for process in job.plan}
    assert list(argv["worker-decode-g1-i0"]) == [
        "trtllm-llmapi-launch", "python3", "-m", "mpi_workers", "--config",
        f"{tmp_path}/config.yaml", "--group", "1", "--index", "0",
    ]  # fmt: skip
    assert job.slicing.group("worker-decode-g1-i0").ranks == 2
    assert [argv[name][0] for name in ("etcd", "nats", "frontend")] == [
        "etcd", "nats-server", "python3",
    ]  # fmt: skip
    step = srun_argv(next(p for p in job.plan if p.name == "worker-decode-g1-i0"), job)
    assert "--container-image=/shared/containers/hpcserve-trtllm-1.2.0.sqsh" in step
    assert f"--container-mounts=/shared:/shared,{tmp_path}:{tmp_path}" in step or any(
        flag.startswith("--container-mounts=") and flag.endswith(f"{tmp_path}:{tmp_path}")
        for flag in step
    )


def test_supervisor_refuses_trtllm_spawn(tmp_path: Path) -> None:
    from slurm.state import read_state
    from slurm.supervise import main

    config = load_config(REPO / "configs" / "slurm-trtllm-agg.yaml", environ={})
    data = config.model_dump(mode="json")
    data["engine"]["trtllm"]["launch"] = "spawn"
    (tmp_path / "logs").mkdir()
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(data))
    # main() is the job's entry point: it ends ignoring SIGTERM/SIGINT/SIGUSR1 (its ordered
    # stop runs to its end). Here it runs inside pytest, whose later children would inherit
    # that: give this process its handlers back.
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    try:
        assert main(["--job-dir", str(tmp_path), "localhost", "w1"]) == 2
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    state = read_state(tmp_path)
    assert state is not None and (state.state, state.component) == ("FAILED", "prepare")
    assert "engine.trtllm.launch: spawn" in (state.message or "")

"""The `slurm:` section validates, normalizes, and names the field in every error."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from contract.slurm_config import SlurmConfig


class _Deployment(BaseModel):
    """Stands in for DeploymentConfig: errors must come out at `slurm.<field>`."""

    slurm: SlurmConfig | None = None


def _error_at(data: dict) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        _Deployment.model_validate({"slurm": data})
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    return ".".join(str(part) for part in errors[0]["loc"]), errors[0]["msg"]


def test_defaults() -> None:
    config = SlurmConfig()
    assert config.partition is None
    assert config.nodes is None
    assert config.gpus_per_node == 0
    assert config.mpi_plugin == "pmix"
    assert config.head_hosts_workers is False
    assert config.extra_sbatch_lines == []
    assert config.env == {}
    assert config.time_limit_minutes is None


def test_full_yaml_section() -> None:
    text = """
    partition: gpu
    account: proj42
    qos: high
    time_limit: "1-02:30:00"
    nodes: 3
    gpus_per_node: 8
    cpus_per_task: 16
    mem: 0
    exclusive: true
    constraint: h100
    extra_sbatch_lines: ["--reservation=demo", "#SBATCH --comment=hpcserve"]
    container:
      image: nvcr.io#nvidia/pytorch:24.05-py3
      mounts: ["/lustre/models:/models:ro", "/scratch:/scratch"]
      workdir: /workspace
    env: {OMP_NUM_THREADS: 4, NCCL_DEBUG: WARN, HPCSERVE_FLAG: true}
    mpi_plugin: pmi2
    setup_lines: ["module load cuda/12.4", "source ~/venv/bin/activate"]
    head_hosts_workers: true
    """
    config = SlurmConfig.model_validate(yaml.safe_load(text))
    assert config.time_limit == "26:30:00"
    assert config.time_limit_minutes == 26 * 60 + 30
    assert config.mem == "0"
    assert config.extra_sbatch_lines == [
        "#SBATCH --reservation=demo",
        "#SBATCH --comment=hpcserve",
    ]
    assert config.env == {"OMP_NUM_THREADS": "4", "NCCL_DEBUG": "WARN", "HPCSERVE_FLAG": "true"}
    assert config.container is not None
    assert config.container.mounts[0] == "/lustre/models:/models:ro"
    assert config.mpi_plugin == "pmi2"


@pytest.mark.parametrize(
    ("given", "stored", "minutes"),
    [
        (30, "0:30:00", 30),
        ("90", "1:30:00", 90),
        ("00:10:30", "0:10:30", 11),
        ("48:00:00", "48:00:00", 2880),
        ("2-00:00:01", "48:00:01", 2881),
    ],
)
def test_time_limit_forms(given: object, stored: str, minutes: int) -> None:
    config = SlurmConfig(time_limit=given)  # type: ignore[arg-type]
    assert config.time_limit == stored
    assert config.time_limit_minutes == minutes


# (id, slurm section, the field the error must name, a word of the message)
INVALID = [
    ("unknown-field", {"partiton": "gpu"}, "slurm.partiton", "Extra inputs"),
    ("time-garbage", {"time_limit": "soon"}, "slurm.time_limit", "minutes or"),
    ("time-minutes-60", {"time_limit": "01:60:00"}, "slurm.time_limit", "below 60"),
    ("time-zero", {"time_limit": 0}, "slurm.time_limit", "at least 1 minute"),
    ("time-zero-hms", {"time_limit": "0:00:00"}, "slurm.time_limit", "longer than zero"),
    ("time-bool", {"time_limit": True}, "slurm.time_limit", "minutes"),
    ("nodes-zero", {"nodes": 0}, "slurm.nodes", "greater than or equal to 1"),
    ("gpus-negative", {"gpus_per_node": -1}, "slurm.gpus_per_node", "greater than or equal"),
    ("cpus-zero", {"cpus_per_task": 0}, "slurm.cpus_per_task", "greater than or equal"),
    ("mem-unit", {"mem": "64GB"}, "slurm.mem", "K/M/G/T"),
    ("partition-space", {"partition": "gpu big"}, "slurm.partition", "whitespace"),
    ("account-empty", {"account": ""}, "slurm.account", "non-empty"),
    ("mpi-plugin", {"mpi_plugin": "pmi1"}, "slurm.mpi_plugin", "'pmix' or 'pmi2'"),
    (
        "sbatch-not-option",
        {"extra_sbatch_lines": ["echo hi"]},
        "slurm.extra_sbatch_lines",
        "item 0",
    ),
    (
        "sbatch-newline",
        {"extra_sbatch_lines": ["--a=1\n--b=2"]},
        "slurm.extra_sbatch_lines",
        "single line",
    ),
    (
        "setup-newline",
        {"setup_lines": ["module load a\nrm -rf /"]},
        "slurm.setup_lines",
        "single line",
    ),
    ("env-name", {"env": {"1BAD": "x"}}, "slurm.env", "environment variable name"),
    ("env-value", {"env": {"A": [1, 2]}}, "slurm.env", "string or a number"),
    (
        "rpn-with-gpus",
        {"gpus_per_node": 4, "ranks_per_node": 2},
        "slurm.ranks_per_node",
        "CPU-only",
    ),
    ("container-no-image", {"container": {"mounts": []}}, "slurm.container.image", "required"),
    (
        "container-mount",
        {"container": {"image": "x", "mounts": ["/only-one-side"]}},
        "slurm.container.mounts",
        "host_path:container_path",
    ),
    (
        "container-mount-comma",
        {"container": {"image": "x", "mounts": ["/a:/b,/c:/d"]}},
        "slurm.container.mounts",
        "commas",
    ),
    (
        "container-extra",
        {"container": {"image": "x", "environment": {}}},
        "slurm.container.environment",
        "Extra inputs",
    ),
    (
        "container-env-name",
        {"container": {"image": "x", "env": ["OK", "NOT-OK"]}},
        "slurm.container.env",
        "item 1",
    ),
    (
        "container-env-mapping",
        {"container": {"image": "x", "env": {"A": "1"}}},
        "slurm.container.env",
        "list",
    ),
]


@pytest.mark.parametrize(
    ("data", "field", "word"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_names_the_field(data: dict, field: str, word: str) -> None:
    location, message = _error_at(data)
    assert location == field
    assert word in message


def test_ranks_per_node_for_cpu_only() -> None:
    assert SlurmConfig(ranks_per_node=3).ranks_per_node == 3


def test_container_defaults_and_flags() -> None:
    """pyxis: home not mounted, entrypoint not run, unless asked; env names pass through."""
    container = SlurmConfig.model_validate({"container": {"image": "img"}}).container
    assert container is not None
    assert (container.env, container.mount_home, container.entrypoint) == ([], False, False)
    given = {"image": "img", "env": ["HF_TOKEN"], "mount_home": True, "entrypoint": True}
    container = SlurmConfig.model_validate({"container": given}).container
    assert container is not None
    assert (container.env, container.mount_home, container.entrypoint) == (["HF_TOKEN"], True, True)

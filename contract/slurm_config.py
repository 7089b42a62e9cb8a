"""The `slurm:` section of a deployment: what the sbatch header and srun steps need to know.

Kept apart from `contract/config.py` (and free of imports of ours) so the Slurm renderer and
the config schema can grow independently. Every validation error is raised from a field
validator, so pydantic reports it at that field (`slurm.time_limit`, `slurm.env`, ...).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-)?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2})$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _one_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} must be a single line")
    return value


class ContainerConfig(BaseModel):
    """A pyxis/enroot container for every srun step (`--container-image` and friends)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="e.g. nvcr.io#nvidia/pytorch:24.05-py3")
    mounts: list[str] = Field(
        default_factory=list, description="`host_path:container_path[:flags]`, as pyxis takes them"
    )
    workdir: str | None = Field(default=None, description="`--container-workdir`")
    env: list[str] = Field(
        default_factory=list,
        description="`--container-env=A,B`: variables whose job values win over the image's",
    )
    mount_home: bool = Field(
        default=False, description="false: `--no-container-mount-home` (the image's own home)"
    )
    entrypoint: bool = Field(
        default=False,
        description="false: `--no-container-entrypoint` (steps run our command directly)",
    )

    @field_validator("image", "workdir")
    @classmethod
    def _no_whitespace(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError("must be non-empty and contain no whitespace")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for index, name in enumerate(names):
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"item {index} ({name!r}) is not an environment variable name")
        return names

    @field_validator("mounts")
    @classmethod
    def _mount_syntax(cls, mounts: list[str]) -> list[str]:
        for index, mount in enumerate(mounts):
            parts = mount.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or any(c.isspace() for c in mount):
                raise ValueError(
                    f"item {index} ({mount!r}) must look like host_path:container_path[:flags]"
                )
            if "," in mount:
                raise ValueError(f"item {index} ({mount!r}): commas separate mounts in pyxis")
        return mounts


class SlurmConfig(BaseModel):
    """Slurm options of one deployment job. None means: leave it to the site's defaults."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(
        default=None, description="`--partition`; None uses the cluster's default partition"
    )
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = Field(
        default=None,
        description="`--time`: minutes (int) or [D-]HH:MM:SS; stored as H:MM:SS",
    )
    nodes: int | None = Field(
        default=None, ge=1, description="`--nodes`; None derives it from the worker groups"
    )
    gpus_per_node: int = Field(default=0, ge=0, description="0 means CPU-only workers")
    ranks_per_node: int | None = Field(
        default=None,
        ge=1,
        description="CPU-only (gpus_per_node 0): worker ranks one node hosts; default 1",
    )
    cpus_per_task: int | None = Field(default=None, ge=1)
    mem: str | None = Field(default=None, description="`--mem`, e.g. 64G; 0 means all of it")
    exclusive: bool = False
    constraint: str | None = None
    extra_sbatch_lines: list[str] = Field(
        default_factory=list,
        description="more sbatch options, `--foo=bar` or `#SBATCH --foo=bar`; stored as the latter",
    )
    container: ContainerConfig | None = None
    env: dict[str, str] = Field(
        default_factory=dict, description="exported in the job before any step starts"
    )
    mpi_plugin: Literal["pmix", "pmi2"] = Field(
        default="pmix", description="`srun --mpi=`: pmix for Open MPI, pmi2 for MPICH"
    )
    setup_lines: list[str] = Field(
        default_factory=list,
        description="shell lines run first in the job (module load, source a venv)",
    )
    head_hosts_workers: bool = Field(
        default=False, description="place worker ranks on the head node too"
    )
    drain_s: int = Field(
        default=120,
        ge=10,
        description="Slurm signals the job (`--signal=B:USR1@drain_s`) this many seconds before "
        "its time limit: the deployment hands over to its successor (if any), drains its "
        "workers and ends FINISHED with reason 'time limit'. Slurm may signal up to 60 s early",
    )
    successor: bool = Field(
        default=False,
        description="submit the next generation of this deployment `successor_lead_s` before "
        "the time limit, so the service outlives the job (needs time_limit)",
    )
    successor_lead_s: int = Field(
        default=600,
        ge=1,
        description="how long before the time limit the successor is submitted: its queue "
        "wait plus start-up must fit in it (at once when the job is shorter)",
    )

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _no_whitespace(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError("must be non-empty and contain no whitespace")
        return value

    @field_validator("time_limit", mode="before")
    @classmethod
    def _time_limit(cls, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("must be minutes or [D-]HH:MM:SS")
        text = str(value).strip()
        if isinstance(value, int) or text.isdigit():
            minutes = int(text)
            if minutes < 1:
                raise ValueError("must be at least 1 minute")
            return f"{minutes // 60}:{minutes % 60:02d}:00"
        match = _TIME_RE.match(text)
        if match is None:
            raise ValueError(f"{value!r} is not minutes or [D-]HH:MM:SS")
        minutes_part, seconds = int(match["m"]), int(match["s"])
        if minutes_part >= 60 or seconds >= 60:
            raise ValueError(f"{value!r}: minutes and seconds must be below 60")
        hours = int(match["days"] or 0) * 24 + int(match["h"])
        if hours == minutes_part == seconds == 0:
            raise ValueError("must be longer than zero")
        return f"{hours}:{minutes_part:02d}:{seconds:02d}"

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML `mem: 0`: all of the node's memory
        if isinstance(value, str) and not _MEM_RE.match(value):
            raise ValueError(f"{value!r} must be a number with an optional K/M/G/T suffix")
        return value

    @field_validator("ranks_per_node")
    @classmethod
    def _ranks_only_cpu(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("gpus_per_node", 0) > 0:
            raise ValueError(
                "only for CPU-only workers; with gpus_per_node > 0 a node hosts one rank per GPU"
            )
        return value

    @field_validator("extra_sbatch_lines")
    @classmethod
    def _sbatch_lines(cls, lines: list[str]) -> list[str]:
        result = []
        for index, line in enumerate(lines):
            _one_line(line, f"item {index}")
            option = line.strip().removeprefix("#SBATCH").strip()
            if not option.startswith("-"):
                raise ValueError(f"item {index} ({line!r}) must be an sbatch option like --foo=bar")
            result.append(f"#SBATCH {option}")
        return result

    @field_validator("setup_lines")
    @classmethod
    def _setup_lines(cls, lines: list[str]) -> list[str]:
        for index, line in enumerate(lines):
            _one_line(line, f"item {index}")
        return lines

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        result = {}
        for key, item in value.items():
            if not isinstance(key, str) or not _ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if isinstance(item, (dict, list)) or item is None:
                raise ValueError(f"{key}: the value must be a string or a number")
            text = str(item).lower() if isinstance(item, bool) else str(item)
            result[key] = _one_line(text, key)
        return result

    @field_validator("successor")
    @classmethod
    def _successor_needs_limit(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("time_limit") is None:
            raise ValueError("needs slurm.time_limit (the successor is timed from it)")
        return value

    @property
    def time_limit_seconds(self) -> int | None:
        if self.time_limit is None:
            return None
        hours, minutes, seconds = (int(part) for part in self.time_limit.split(":"))
        return hours * 3600 + minutes * 60 + seconds

    @property
    def time_limit_minutes(self) -> int | None:
        """The time limit in whole minutes (rounded up), as submitit's `timeout_min` wants."""
        if self.time_limit is None:
            return None
        hours, minutes, seconds = (int(part) for part in self.time_limit.split(":"))
        return hours * 60 + minutes + (1 if seconds else 0)

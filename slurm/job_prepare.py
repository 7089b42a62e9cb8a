"""At job start, on the head node: turn the allocation into the job's plan.

The sbatch script knows only what was known at submit time. This adds what only the running
job knows: the node list (sliced: head first, then worker groups), the head's address and
free ports for etcd/NATS. It writes the resolved config (`<job_dir>/config.yaml`, which every
component reads) and returns the plan (`contract.plan.plan_deployment`, the same plan `hpcserve
up` spawns) with each worker's node slice, for the supervisor (`slurm.supervise`) to run as
srun steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from contract.config import ConfigError, DeploymentConfig, engine_yaml_fields, load_config
from contract.plan import (
    PlannedProcess,
    clear_frontend_metrics,
    find_binary,
    plan_deployment,
)
from contract.readiness import free_port
from contract.slurm_config import SlurmConfig
from slurm.render import slurm_options
from slurm.slicing import Slicing, SlicingError, slice_nodes
from slurm.steps import check_names, group_needs

logger = logging.getLogger("slurm.job_prepare")

# Inside `slurm.container` the components run the image's own Python and service binaries
# (containers/trtllm/Dockerfile installs hpcserve, etcd and nats-server there), not ours.
CONTAINER_PYTHON = "python3"
LOOPBACK = ("127.0.0.1", "localhost", "")


@dataclass(frozen=True)
class PreparedJob:
    """What the supervisor needs to run the job: the resolved config, its plan, where each
    worker runs, and where the frontend answers."""

    config: DeploymentConfig
    plan: list[PlannedProcess]
    slicing: Slicing
    head_addr: str
    url: str
    job_dir: Path

    @property
    def slurm(self) -> SlurmConfig:
        return slurm_options(self.config)


def head_address(head: str) -> str:
    """The head's address as other nodes reach it; HPCSERVE_HEAD_ADDR overrides (multi-NIC)."""
    override = os.environ.get("HPCSERVE_HEAD_ADDR")
    if override:
        return override
    try:
        return socket.gethostbyname(head)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the head node {head!r}: {exc}") from exc


def resolve(
    config: DeploymentConfig, job_dir: Path, head_addr: str
) -> tuple[DeploymentConfig, int | None]:
    """Endpoints on the head's address, free ports, the model path checked, run_dir = job dir.

    With `slurm.container` the model path is the container's view (its mounts), which this
    step, run on the head outside the container, cannot see: the components check it there.
    """
    data = config.model_dump(mode="json")
    data["run_dir"] = str(job_dir)
    model_path = config.model.resolved_path()
    in_container = config.slurm is not None and config.slurm.container is not None
    needs_folder = config.engine.kind != "mocker" and not in_container
    if needs_folder and not (model_path / "config.json").is_file():
        raise ConfigError(f"model.path: {model_path} is not a model folder (no config.json)")
    data["model"]["path"] = str(model_path)
    _copy_engine_yamls(data, job_dir)
    if config.frontend.host in LOOPBACK:
        data["frontend"]["host"] = head_addr
    bind = data["frontend"]["host"]
    if config.frontend.port == 0:
        data["frontend"]["port"] = free_port("0.0.0.0" if bind == "0.0.0.0" else bind)
    peer_port = None
    if config.services.etcd.start:
        data["services"]["etcd"]["endpoint"] = f"http://{head_addr}:{free_port(head_addr)}"
        peer_port = free_port(head_addr)
    if config.services.nats.start:
        data["services"]["nats"]["endpoint"] = f"nats://{head_addr}:{free_port(head_addr)}"
    return DeploymentConfig.model_validate(data), peer_port


def _copy_engine_yamls(data: dict[str, Any], job_dir: Path) -> None:
    """TensorRT-LLM engine YAMLs the head can read are copied into the job dir and the config
    points at the copies: the job records what it ran, and a container (which mounts the job
    dir) sees them. A path the head cannot read is left alone (a path inside the image)."""
    for holder, key, prefix in engine_yaml_fields(data):
        value = holder.get(key)
        if not value or not Path(value).is_file():
            continue
        copy = job_dir / "engine_configs" / f"{prefix}-{Path(value).name}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(value, copy)
        holder[key] = str(copy)


def probe_from_anywhere(process: PlannedProcess, head_addr: str) -> PlannedProcess:
    """The frontend's health probe on the head's address, not loopback: the supervisor runs
    on the head in a batch job, but anywhere in the allocation under `up --in-allocation`."""
    ready = process.ready
    if process.role != "frontend" or ready.url is None or "://127.0.0.1:" not in ready.url:
        return process
    url = ready.url.replace("://127.0.0.1:", f"://{head_addr}:", 1)
    return dataclasses.replace(process, ready=dataclasses.replace(ready, url=url))


def frontend_url(config: DeploymentConfig, head_addr: str) -> str:
    host = config.frontend.host
    return f"http://{head_addr if host == '0.0.0.0' else host}:{config.frontend.port}/v1"


def prepare(config_path: Path, job_dir: Path, nodes: list[str]) -> PreparedJob:
    """Slice `nodes`, resolve and write the config, plan; ConfigError names what is wrong."""
    config = load_config(config_path, environ={})
    slurm = slurm_options(config)
    try:
        slicing = slice_nodes(
            nodes, group_needs(config),
            gpus_per_node=slurm.gpus_per_node,
            head_hosts_workers=slurm.head_hosts_workers,
            ranks_per_node=slurm.ranks_per_node,
        )  # fmt: skip
    except SlicingError as exc:
        raise ConfigError(str(exc)) from None
    head_addr = head_address(slicing.head)
    resolved, peer_port = resolve(config, job_dir, head_addr)
    config_file = job_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
    services = resolved.services
    if slurm.container is None:
        python = sys.executable
        etcd = find_binary("etcd") if services.etcd.start else "etcd"
        nats = find_binary("nats-server") if services.nats.start else "nats-server"
    else:
        python, etcd, nats = CONTAINER_PYTHON, "etcd", "nats-server"
    plan = plan_deployment(
        resolved,
        config_file=str(config_file),
        run_dir=str(job_dir),
        python=python,
        etcd_binary=etcd,
        nats_binary=nats,
        etcd_peer_port=peer_port,
        head_worker_ranks=sum(
            group.ranks_per_node for group in slicing.groups if slicing.head in group.nodes
        ),
    )
    clear_frontend_metrics(plan)
    check_names(plan, config)
    plan = [probe_from_anywhere(process, head_addr) for process in plan]
    url = frontend_url(resolved, head_addr)
    logger.info("head %s (%s); frontend %s", slicing.head, head_addr, url)
    for group in slicing.groups:
        logger.info("%s on %s, %d rank(s) per node", group.name, ",".join(group.nodes),
                    group.ranks_per_node)  # fmt: skip
    if slicing.unused:
        logger.warning("allocated but unused: %s", ",".join(slicing.unused))
    return PreparedJob(resolved, plan, slicing, head_addr, url, job_dir)

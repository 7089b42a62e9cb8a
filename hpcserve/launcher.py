"""`hpcserve up` on one machine: resolve the config, spawn the deployment plan, watch it, stop it.

1. Resolve: a run folder, the model path (None → the prepared default), free ports for the
   services we start and for frontend port 0. The resolved config is written to
   `run_dir/config.yaml`; every component reads that file (environment overrides were
   applied once, here, and are not passed on).
2. Hand `contract.plan.plan_deployment(...)` to the supervisor (`contract.supervisor`, the
   same one the Slurm job runs), which starts it stage by stage, each process a local
   process group with its log in `run_dir/logs/` and its readiness awaited (no sleeps); PIDs
   go to `run_dir/pids.json`.
3. Print `hpcserve ready: http://HOST:PORT/v1`, then serve: a crashed component is restarted
   under its restart policy; a critical one out of restarts stops all and fails with its log
   tail. SIGINT/SIGTERM stop everything in reverse order, stage by stage.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from contract import mpirun
from contract.api_keys import load_api_keys
from contract.config import (
    ENV_PREFIX,
    ConfigError,
    DeploymentConfig,
    cache_dir,
)
from contract.model_fit import check_model_tp
from contract.plan import (
    TRTLLM_LAUNCHER,
    PlannedProcess,
    clear_frontend_metrics,
    find_binary,
    needs_mpi_launcher,
    plan_deployment,
    split_url,
    uses_llmapi_launch,
)
from contract.processes import ManagedProcess
from contract.readiness import free_port, port_open
from contract.supervisor import DeploymentFailed, Supervisor
from hpcserve.model_prepare import is_prepared, prepare_model

Say = Callable[[str], None]


def _say(message: str) -> None:
    print(f"hpcserve: {message}", flush=True)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised from the signal handler to unwind to the cleanup."""


@dataclass
class Deployment:
    config: DeploymentConfig
    run_dir: Path
    config_file: Path
    plan: list[PlannedProcess]
    supervisor: Supervisor | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host = _probe_host(self.config.frontend.host)
        return f"http://{host}:{self.config.frontend.port}/v1"

    @property
    def processes(self) -> list[tuple[PlannedProcess, ManagedProcess]]:
        """The processes running now (a restarted component: its latest process)."""
        if self.supervisor is None:
            return []
        return [(c.planned, c.process) for c in self.supervisor.components if c.process]


def new_run_dir(config: DeploymentConfig) -> Path:
    if config.run_dir:
        run_dir = Path(config.run_dir).expanduser()
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = cache_dir() / "runs" / f"{config.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = cache_dir() / "runs" / f"{config.name}-{stamp}-{suffix}"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return run_dir.resolve()


def resolve_config(
    config: DeploymentConfig, run_dir: Path, say: Say = _say
) -> tuple[DeploymentConfig, int | None]:
    """Fill in what the plan needs; returns the resolved config and etcd's peer port."""
    data = config.model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    if config.model.path:
        model_path = Path(config.model.path).expanduser()
        if not (model_path / "config.json").is_file():
            raise ConfigError(f"model.path: {model_path} is not a model folder (no config.json)")
    else:
        model_path = config.model.resolved_path()
        if not is_prepared(model_path):
            say(f"preparing the model {config.model.prepared} (one time)")
        model_path = prepare_model(config.model.prepared)
    data["model"]["path"] = str(model_path.resolve())
    probe = _probe_host(config.frontend.host)
    if config.frontend.port == 0:
        data["frontend"]["port"] = free_port(probe)
    elif port_open(probe, config.frontend.port):
        raise ConfigError(
            f"frontend.port: {probe}:{config.frontend.port} is in use (--set frontend.port=0"
            " picks a free one)"
        )
    peer_port = None
    services = data["services"]
    if config.services.etcd.start:
        services["etcd"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
        peer_port = free_port()
    if config.services.nats.start:
        services["nats"]["endpoint"] = f"nats://127.0.0.1:{free_port()}"
    return DeploymentConfig.model_validate(data), peer_port


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def child_env() -> dict[str, str]:
    """Our environment minus HPCSERVE__ overrides: the written config already holds them."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def check_external_services(config: DeploymentConfig) -> None:
    for name, service, default_port in (
        ("etcd", config.services.etcd, 2379),
        ("nats", config.services.nats, 4222),
    ):
        if not service.start:
            assert service.endpoint is not None
            host, port = split_url(service.endpoint, default_port)
            if not port_open(host, port):
                raise ConfigError(f"services.{name}.endpoint: nothing listens on {host}:{port}")


def find_mpirun() -> str:
    """The local `mpirun` (see `contract.mpirun`); ConfigError when there is none."""
    found = mpirun.find_mpirun()
    if not found:
        raise ConfigError(
            "workers.N.tp: tp > 1 (or TensorRT-LLM's tp * pipeline_parallel_size) needs "
            "`mpirun` (pip install mpich mpi4py, or Open MPI)"
        )
    return found


def mpi_launcher(path: str | None = None) -> tuple[str, ...]:
    """The `mpirun` prefix (with its implementation's flags) for a local TP group."""
    return mpirun.mpi_launcher(path or find_mpirun())


def check_trtllm_launcher(config: DeploymentConfig) -> None:
    """Multi-rank TensorRT-LLM groups start every rank under `trtllm-llmapi-launch`, which
    comes with `tensorrt_llm`: say so before anything starts, not in a worker's log."""
    for index, group in enumerate(config.workers):
        if uses_llmapi_launch(config, group) and shutil.which(TRTLLM_LAUNCHER) is None:
            raise ConfigError(
                f"engine.kind trtllm: {TRTLLM_LAUNCHER} is not on PATH: run inside NVIDIA's "
                "TensorRT-LLM container or `pip install tensorrt_llm` from NVIDIA's index "
                f"(workers.{index} has more than one rank; engine.trtllm.launch: "
                "llmapi-launch)"
            )


def prepare_deployment(config: DeploymentConfig, say: Say = _say) -> Deployment:
    """Resolve the config, write it to the run folder, and plan; nothing is started yet."""
    check_trtllm_launcher(config)
    if load_api_keys(config.frontend.api_key_file):  # a bad key file fails before any start
        say("API keys set: /v1 requests need `Authorization: Bearer <key>`")
    run_dir = new_run_dir(config)
    resolved, peer_port = resolve_config(config, run_dir, say)
    check_external_services(resolved)
    needs_mpi = needs_mpi_launcher(resolved)
    if needs_mpi and resolved.engine.kind == "torch":
        check_model_tp(resolved.model.resolved_path(), resolved)
    config_file = run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
    plan = plan_deployment(
        resolved,
        config_file=str(config_file),
        run_dir=str(run_dir),
        python=sys.executable,
        etcd_binary=find_binary("etcd") if resolved.services.etcd.start else "etcd",
        nats_binary=find_binary("nats-server") if resolved.services.nats.start else "nats-server",
        etcd_peer_port=peer_port,
        mpi_launcher=mpi_launcher() if needs_mpi else None,
    )
    clear_frontend_metrics(plan)
    say(f"run folder {run_dir}")
    return Deployment(resolved, run_dir, config_file, plan)


def local_launch(deployment: Deployment) -> Callable[[PlannedProcess], ManagedProcess]:
    """How the supervisor starts a component here: a local process group, log appended."""
    env = child_env()

    def launch(planned: PlannedProcess) -> ManagedProcess:
        log_path = deployment.run_dir / "logs" / f"{planned.name}.log"
        return ManagedProcess.spawn(planned.name, planned.argv, log_path,
                                    env={**env, **planned.env})  # fmt: skip

    return launch


def spawn_deployment(deployment: Deployment, say: Say = _say) -> None:
    """Start the plan stage by stage; the caller stops `deployment` whatever happens."""
    deployment.supervisor = Supervisor(
        deployment.config, deployment.plan, local_launch(deployment),
        run_dir=deployment.run_dir, say=say,
    )  # fmt: skip
    deployment.supervisor.start()


def start_deployment(
    config: DeploymentConfig,
    say: Say = _say,
    adjust: Callable[[Deployment], None] | None = None,
) -> Deployment:
    """Prepare and spawn; on failure everything started is stopped again. `adjust` may edit
    the plan in between (a benchmark pins each worker to a GPU through its env). Nothing
    watches the result: `serve_deployment` does (restarts), or the caller."""
    deployment = prepare_deployment(config, say)
    if adjust is not None:
        adjust(deployment)
    try:
        spawn_deployment(deployment, say)
    except BaseException:
        stop_deployment(deployment, say)
        raise
    return deployment


def serve_deployment(deployment: Deployment) -> None:
    """Watch and restart until a critical component is down for good (DeploymentFailed)."""
    assert deployment.supervisor is not None
    deployment.supervisor.serve()


def stop_deployment(deployment: Deployment, say: Say = _say) -> None:
    """Stop every process, last stage first; one stage's processes in parallel."""
    if deployment.supervisor is not None:
        deployment.supervisor.stop()


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_up(config: DeploymentConfig, say: Say = _say) -> int:
    """Start, serve until a signal (exit 0) or a critical failure (exit 1), stop everything."""
    previous = {
        sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    deployment: Deployment | None = None
    try:
        deployment = prepare_deployment(config, say)
        try:
            spawn_deployment(deployment, say)
        except DeploymentFailed as exc:
            print(f"hpcserve: start-up failed: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"hpcserve ready: {deployment.url}", flush=True)
        try:
            serve_deployment(deployment)
        except DeploymentFailed as exc:
            print(f"hpcserve: {exc}\nhpcserve: {exc.component} is critical; stopping all.",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 1
        return 0
    except Interrupted as exc:
        say(f"{exc}: stopping")
        return 0
    finally:
        # No second interrupt may leave orphans behind: cleanup runs to the end.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if deployment is not None:
            stop_deployment(deployment, say)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

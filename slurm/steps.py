"""How the deployment plan's processes map onto srun steps: step names and the node slicing
input (one slicing group per worker, one srun step each).

Shared by the renderer (at `hpcserve render/submit` time) and `slurm.job_prepare` (at job
start, on the head node), so the checks at submit time are the ones the job relies on.
"""

from __future__ import annotations

from contract.config import ConfigError, DeploymentConfig, group_ranks
from contract.plan import PlannedProcess, plan_deployment, worker_processes
from slurm.slicing import GroupNeed

PLACEHOLDER_ETCD = "http://head:2379"
PLACEHOLDER_NATS = "nats://head:4222"


def check_slurm_launch(config: DeploymentConfig) -> None:
    """Every multi-rank engine must be startable as one srun step of its ranks: TensorRT-LLM's
    `spawn` (MPI_Comm_spawn from one process) does not work under Slurm's PMIx."""
    if config.engine.kind != "trtllm" or config.engine.trtllm.launch != "spawn":
        return
    for index, group in enumerate(config.workers):
        ranks = group_ranks(config, group)
        if ranks > 1:
            raise ConfigError(
                f"engine.trtllm.launch: spawn cannot start workers.{index}'s {ranks} ranks "
                "under Slurm (MPI_Comm_spawn does not work under Slurm's PMIx); use "
                "llmapi-launch (each rank an srun task under trtllm-llmapi-launch)"
            )


def group_needs(config: DeploymentConfig) -> list[GroupNeed]:
    """One slicing group per worker process (one srun step): its MPI ranks are its TP size
    (times the pipeline stages of a TensorRT-LLM engine); a process hosting several simulated
    workers is one rank."""
    check_slurm_launch(config)
    return [
        GroupNeed(process.name, group_ranks(config, config.workers[process.group]))
        for process in worker_processes(config)
    ]


def placeholder_plan(config: DeploymentConfig) -> list[PlannedProcess]:
    """The plan's shape (names, stages, env) before the head's address and ports are known
    (one frontend process unless `frontend.workers` says more)."""
    data = config.model_dump(mode="json")
    for name, url in (("etcd", PLACEHOLDER_ETCD), ("nats", PLACEHOLDER_NATS)):
        data["services"][name]["endpoint"] = data["services"][name]["endpoint"] or url
    if data["frontend"]["port"] == 0:
        data["frontend"]["port"] = 8000
    resolved = type(config).model_validate(data)
    # an automatic frontend.workers is decided in the job, on the head node's cores
    return plan_deployment(
        resolved, config_file="JOB_DIR/config.yaml", run_dir="JOB_DIR",
        frontend_count=config.frontend.workers or 1,
    )  # fmt: skip


def check_names(plan: list[PlannedProcess], config: DeploymentConfig) -> None:
    """Worker step names of the plan and of the slicing groups must be the same list."""
    workers = [p.name for p in plan if p.group is not None]
    needs = [need.name for need in group_needs(config)]
    if workers != needs:
        raise RuntimeError(f"plan workers {workers} differ from slicing groups {needs}")

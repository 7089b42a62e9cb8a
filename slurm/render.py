"""Render a deployment config into its sbatch script (`slurm/templates/sbatch.sh.j2`).

What is known at submit time is rendered here: the `#SBATCH` header (nodes derived from the
worker groups when not given), setup lines, and one srun line per process of the plan, in
the plan's stages. What only the running job knows (nodes, the head's address, ports, each
step's argv) comes from `slurm.job_prepare` at job start, through the `plan.sh` variables the
srun lines name. Pure: the same config, job dir and Python give the same text (golden files).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from contract.config import ConfigError, DeploymentConfig
from contract.plan import (
    STAGE_FRONTEND,
    STAGE_SERVICES,
    STAGE_WORKERS,
    STOP_TIMEOUT_S,
    WORKER_STOP_TIMEOUT_S,
    PlannedProcess,
)
from contract.slurm_config import SlurmConfig
from slurm.slicing import SlicingError, nodes_needed
from slurm.steps import check_names, group_needs, placeholder_plan, var_suffix

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE = "sbatch.sh.j2"
_CONT = " \\\n    "


@dataclass(frozen=True)
class Step:
    name: str
    var: str
    launch: str  # the `launch STAGE NAME srun-options... argv` line


def slurm_options(config: DeploymentConfig) -> SlurmConfig:
    return config.slurm or SlurmConfig()


def node_count(config: DeploymentConfig) -> int:
    """`slurm.nodes`, or the head plus the worker nodes the slicing will use."""
    slurm = slurm_options(config)
    try:
        needed = nodes_needed(
            group_needs(config), slurm.gpus_per_node, slurm.head_hosts_workers,
            slurm.ranks_per_node,
        )  # fmt: skip
    except SlicingError as exc:
        raise ConfigError(f"slurm: {exc}") from None
    if slurm.nodes is None:
        return needed
    if slurm.nodes < needed:
        raise ConfigError(
            f"slurm.nodes: {slurm.nodes} node(s) cannot hold the worker groups; they need "
            f"{needed} (head included)"
        )
    return slurm.nodes


def tasks_per_node(slurm: SlurmConfig) -> int:
    return slurm.gpus_per_node or slurm.ranks_per_node or 1


def sbatch_lines(config: DeploymentConfig, job_dir: str) -> list[str]:
    slurm = slurm_options(config)
    options: list[str] = [f"--job-name={config.name}"]
    for flag, value in (
        ("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos),
        ("time", slurm.time_limit),
    ):  # fmt: skip
        if value is not None:
            options.append(f"--{flag}={value}")
    options += [f"--nodes={node_count(config)}", f"--ntasks-per-node={tasks_per_node(slurm)}"]
    if slurm.gpus_per_node:
        options.append(f"--gpus-per-node={slurm.gpus_per_node}")
    if slurm.cpus_per_task is not None:
        options.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.mem is not None:
        options.append(f"--mem={slurm.mem}")
    if slurm.exclusive:
        options.append("--exclusive")
    if slurm.constraint is not None:
        options.append(f"--constraint={slurm.constraint}")
    options.append(f"--output={job_dir}/logs/sbatch.log")
    return [f"#SBATCH {option}" for option in options] + list(slurm.extra_sbatch_lines)


def container_options(slurm: SlurmConfig, job_dir: str) -> list[str]:
    """pyxis flags of every srun step. The job dir is mounted at its own path (the resolved
    config, logs and engine YAMLs live there). Home is not mounted and the image's entrypoint
    not run unless asked (as srt-slurm does): a step runs our command in the image as it is."""
    container = slurm.container
    if container is None:
        return []
    if "," in job_dir or ":" in job_dir:
        raise ConfigError(
            f"run_dir: the job dir {job_dir!r} is mounted into slurm.container; pyxis mounts "
            "cannot hold ',' or ':'"
        )
    options = [f"--container-image={container.image}"]
    options.append(f"--container-mounts={','.join([*container.mounts, f'{job_dir}:{job_dir}'])}")
    if container.workdir:
        options.append(f"--container-workdir={container.workdir}")
    if container.env:
        options.append(f"--container-env={','.join(container.env)}")
    options.append(f"--{'' if container.mount_home else 'no-'}container-mount-home")
    options.append(f"--{'' if container.entrypoint else 'no-'}container-entrypoint")
    return [shlex.quote(option) for option in options]


def _export(process: PlannedProcess) -> str:
    pairs = "".join(f",{key}={value}" for key, value in sorted(process.env.items()))
    return shlex.quote(f"--export=ALL{pairs}")


def _launch(stage: int, name: str, option_rows: list[list[str]], var: str) -> str:
    rows = [f"launch {stage} {name} " + " ".join(option_rows[0])]
    rows += [" ".join(row) for row in option_rows[1:] if row]
    rows.append(f'"${{ARGV_{var}[@]}}"')
    return _CONT.join(rows)


def head_step(process: PlannedProcess, slurm: SlurmConfig, job_dir: str) -> Step:
    """etcd, NATS, frontend: one task on the head, overlapping whatever else runs there."""
    var = var_suffix(process.name)
    rows = [
        ["--overlap", "--mpi=none", "-N1", "-n1", '-w "$HEAD"'],
        [_export(process)],
        container_options(slurm, job_dir),
    ]
    return Step(process.name, var, _launch(process.stage, process.name, rows, var))


def worker_step(process: PlannedProcess, slurm: SlurmConfig, job_dir: str) -> Step:
    """One engine instance: one MPI step over its node slice, ntasks = its ranks (tp, times pp
    for TensorRT-LLM). One rule for the MPI plugin, every engine alike: `slurm.mpi_plugin`
    (default pmix, what TensorRT-LLM's Open MPI needs under trtllm-llmapi-launch)."""
    var = var_suffix(process.name)
    ranks = [f"--mpi={slurm.mpi_plugin}", f'-N "$NNODES_{var}"', f'-n "$NTASKS_{var}"']
    placement = [f'--ntasks-per-node="$RPN_{var}"', f'-w "$NODES_{var}"']
    resources = ["--kill-on-bad-exit=1"]
    if slurm.gpus_per_node:
        resources.append(f'--gpus-per-node="$RPN_{var}"')
    if slurm.cpus_per_task is not None:
        resources.append(f"--cpus-per-task={slurm.cpus_per_task}")
    rows = [ranks, placement, [*resources, _export(process)], container_options(slurm, job_dir)]
    return Step(process.name, var, _launch(process.stage, process.name, rows, var))


def render_script(
    config: DeploymentConfig, *, job_dir: str | Path, python: str, source: str | None = None
) -> str:
    """The sbatch script of `config` for a job whose files live in `job_dir`."""
    job_dir = str(job_dir)
    if any(c.isspace() for c in job_dir) or any(c.isspace() for c in python):
        raise ConfigError(f"run_dir: the job dir {job_dir!r} must not contain whitespace")
    slurm = slurm_options(config)
    plan = placeholder_plan(config)
    check_names(plan, config)
    services = [head_step(p, slurm, job_dir) for p in plan if p.stage == STAGE_SERVICES]
    workers = [worker_step(p, slurm, job_dir) for p in plan if p.stage == STAGE_WORKERS]
    frontend = next(head_step(p, slurm, job_dir) for p in plan if p.stage == STAGE_FRONTEND)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        comment_start_string="<#",  # bash's ${#array[@]} is not a comment
        comment_end_string="#>",
    )
    return env.get_template(TEMPLATE).render(
        name=config.name,
        source=source,
        sbatch_lines=sbatch_lines(config, job_dir),
        job_dir=shlex.quote(job_dir),
        python=shlex.quote(python),
        setup_lines=slurm.setup_lines,
        env_lines=[f"export {key}={shlex.quote(value)}" for key, value in slurm.env.items()],
        services=services,
        workers=workers,
        frontend=frontend,
        stop_s=STOP_TIMEOUT_S,
        worker_stop_s=WORKER_STOP_TIMEOUT_S,
    )

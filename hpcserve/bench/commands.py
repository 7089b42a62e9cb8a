"""`hpcserve bench TARGET` and `hpcserve bench compare RUN...` (wired into `hpcserve.cli`).

The options are the `benchmark:` section of the config schema (`contract.config.
BenchmarkConfig`), given on the command line: each becomes a `benchmark.FIELD=value`
override over the target's own section (a config's or a job's), so a bad value is refused
naming the field, exactly as in a YAML file. Exit codes: 0 every point valid, 1 a point
invalid (or the deployment failed, or the target is not there), 2 a config error.
"""

from __future__ import annotations

import json
import signal
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:  # the sweep imports matplotlib: only a sweep loads it, not every command
    from hpcserve.bench.results import BenchRun
    from hpcserve.bench.sweep import Target


class _BenchGroup(TyperGroup):
    """`hpcserve bench TARGET ...` means `hpcserve bench run TARGET ...`; `compare` and
    `run` are subcommands."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=_BenchGroup,
    help="Load sweeps with aiperf: `hpcserve bench TARGET`, `hpcserve bench compare RUN...`.",
    no_args_is_help=True,
)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"hpcserve bench: {message}", err=True)
    return typer.Exit(code)


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise _fail(f"--concurrency {text!r}: a comma-separated list of integers", 2) from None
    if not values:
        raise _fail("--concurrency: at least one value", 2)
    return values


def bench_overrides(options: dict[str, Any]) -> list[str]:
    """`benchmark.FIELD=value` for every option given (JSON values: YAML reads them as is)."""
    return [f"benchmark.{name}={json.dumps(value)}" for name, value in options.items()
            if value is not None]  # fmt: skip


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@bench_app.command("run")
def bench_run(
    target: Annotated[str, typer.Argument(
        help="a deployment YAML (started here, stopped after), a Slurm job id or job dir, or a "
        "URL (http://host:port or http://host:port/v1)", show_default=False)],
    concurrency: Annotated[str | None, typer.Option(
        help="points of the sweep, e.g. 1,2,4,8 (default: 1,2,4,8)")] = None,
    requests: Annotated[int | None, typer.Option(
        help="requests per point (default: max(16, 4 x concurrency))")] = None,
    duration: Annotated[float | None, typer.Option(
        help="seconds per point instead of a request count")] = None,
    isl: Annotated[int | None, typer.Option(help="input tokens, mean (default: 128)")] = None,
    isl_stddev: Annotated[float | None, typer.Option(help="input tokens, stddev")] = None,
    osl: Annotated[int | None, typer.Option(help="output tokens, mean (default: 64)")] = None,
    osl_stddev: Annotated[float | None, typer.Option(help="output tokens, stddev")] = None,
    stream: Annotated[bool | None, typer.Option(
        "--stream/--no-stream", help="SSE streaming (TTFT/ITL need it) (default: stream)")] = None,
    endpoint: Annotated[str | None, typer.Option(
        help="chat, completions, responses or embeddings (a model.task: embed deployment)")] = None,
    system_prompt_tokens: Annotated[int | None, typer.Option(
        help="shared prefix: one system prompt of N tokens in every request")] = None,
    prefix_prompts: Annotated[int | None, typer.Option(
        help="shared prefix: a pool of N prefixes (with --prefix-tokens)")] = None,
    prefix_tokens: Annotated[int | None, typer.Option(
        help="shared prefix: tokens of each pooled prefix")] = None,
    turns: Annotated[int | None, typer.Option(
        help="multi-turn: turns per conversation (each resends the history)")] = None,
    seed: Annotated[int | None, typer.Option(help="aiperf's random seed (default: 0)")] = None,
    warmup: Annotated[int | None, typer.Option(
        help="unmeasured warm-up requests per point")] = None,
    gpus: Annotated[int | None, typer.Option(
        help="GPU count for tok/s/GPU (default: the deployment's worker ranks; 1 for a URL)"
    )] = None,
    label: Annotated[str | None, typer.Option(help="the run's name in tables and plots")] = None,
    model: Annotated[str | None, typer.Option(help="model name (default: the served one)")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="tokenizer folder for a URL target (default: the prepared default model)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="run folder (default: ~/.cache/hpcserve/bench/LABEL-TIME)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override a config field, e.g. --set benchmark.then=exit")] = None,
) -> None:  # fmt: skip
    """Sweep TARGET over concurrencies with aiperf; exit 1 if a point is invalid.

    Invalid: failed requests, zero output tokens (but for embeddings), or fewer completed
    requests than asked. A target whose model.task does not serve --endpoint is refused.
    """
    import logging

    from contract.config import BenchmarkConfig, ConfigError, load_config
    from contract.supervisor import DeploymentFailed
    from hpcserve.bench import sweep
    from hpcserve.bench.aiperf_run import AiperfMissing
    from hpcserve.bench.display import console, runs_table

    logging.basicConfig(level=logging.WARNING, format="hpcserve: %(message)s")
    shared = {"system_prompt_tokens": system_prompt_tokens, "prefix_prompts": prefix_prompts,
              "prefix_tokens": prefix_tokens, "turns": turns}  # fmt: skip
    options: dict[str, Any] = {
        "concurrency": _concurrency_list(concurrency) if concurrency is not None else None,
        "requests": requests, "duration_s": duration, "streaming": stream,
        "endpoint": endpoint, "seed": seed, "warmup_requests": warmup, "gpus": gpus,
        "label": label,
    }  # fmt: skip
    overrides = [*(set_ or []), *bench_overrides(options)]
    for section, values in (
        ("input_tokens", {"mean": isl, "stddev": isl_stddev}),
        ("output_tokens", {"mean": osl, "stddev": osl_stddev}),
        ("shared_prefix", shared),
    ):
        overrides += [f"benchmark.{section}.{key}={json.dumps(value)}"
                      for key, value in values.items() if value is not None]  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    folder: Path | None = None
    try:
        if target.startswith(("http://", "https://")):
            config = load_config(None, overrides)
            bench = config.benchmark or BenchmarkConfig()
            found = sweep.url_target(target, bench, model, tokenizer)
            folder = sweep.new_run_folder(found.label, out)
            run = _sweep_with_display(found, folder)
        elif Path(target).is_file():
            # A free frontend port unless --set says otherwise: a sweep needs no fixed one.
            config = load_config(Path(target), ["frontend.port=0", *overrides])
            with sweep.config_target(config, target, model, say=typer.echo) as found:
                folder = sweep.new_run_folder(found.label, out)
                run = _sweep_with_display(found, folder)
        else:
            found = sweep.job_target(target, overrides, model)
            folder = sweep.new_run_folder(found.label, out)
            run = _sweep_with_display(found, folder)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    except (sweep.TargetError, AiperfMissing) as exc:
        raise _fail(str(exc), 1) from None
    except DeploymentFailed as exc:
        raise _fail(f"the deployment failed during the sweep: {exc}", 1) from None
    except KeyboardInterrupt as exc:
        where = f"; what was measured is in {folder}" if folder else ""
        raise _fail(f"interrupted ({exc or 'SIGINT'}){where}", 130) from None
    console().print(runs_table([run]))
    typer.echo(f"results: {folder}/bench.json, bench.csv, pareto.png, latency.png")
    bad = [point for point in run.points if not point.valid]
    if bad:
        raise _fail(f"{len(bad)} of {len(run.points)} points INVALID: " + "; ".join(
            f"concurrency {p.concurrency}: {p.reason}" for p in bad), 1)  # fmt: skip


def _sweep_with_display(found: Target, folder: Path) -> BenchRun:
    from hpcserve.bench import sweep
    from hpcserve.bench.display import SweepDisplay

    typer.echo(f"benchmarking {found.url} (model {found.model}, {found.gpus} GPU: "
               f"{found.gpus_from}) into {folder}")  # fmt: skip
    with SweepDisplay(len(found.bench.concurrency)) as display:
        return sweep.run_sweep(found, folder, display)


@bench_app.command("compare")
def bench_compare(
    runs: Annotated[list[Path], typer.Argument(help="run folders (or their bench.json)")],
    out: Annotated[Path | None, typer.Option(
        help="where the plots and compare.csv go (default: ~/.cache/hpcserve/bench/compare-TIME)"
    )] = None,
) -> None:  # fmt: skip
    """Overlay runs (agg vs disagg, router policies) in one table and one set of plots.

    Writes compare.csv, pareto.png and latency.png: one colour and one frontier per run.
    """
    from pydantic import ValidationError

    from contract.config import cache_dir
    from hpcserve.bench.display import console, runs_table
    from hpcserve.bench.plots import write_plots
    from hpcserve.bench.results import load_run, write_table

    loaded = []
    for path in runs:
        try:
            loaded.append(load_run(path))
        except (FileNotFoundError, ValidationError, ValueError) as exc:
            raise _fail(f"{path}: {exc}", 2) from None
    seen: dict[str, int] = {}
    for run in loaded:  # two runs of one config: tell them apart in the legend
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = (out or cache_dir() / "bench" / f"compare-{stamp}").expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    write_table(folder / "compare.csv", loaded)
    write_plots(loaded, folder)
    console().print(runs_table(loaded))
    typer.echo(f"compared {len(loaded)} runs: {folder}/compare.csv, pareto.png, latency.png")
    invalid = [run.label for run in loaded if not run.valid]
    if invalid:
        typer.echo(f"hpcserve bench: runs with INVALID points: {', '.join(invalid)}", err=True)

"""aiperf at one concurrency point: its command line, the process, and what its exports say.

aiperf (`pip install 'hpcserve[bench]'`) generates synthetic prompts with the served model's
tokenizer (`--tokenizer DIR`: offline, no hub) and counts tokens the way the server reports
them (`--use-server-token-count`: the usage numbers, not a second tokenization) wherever
aiperf reads them (not of embeddings, nor of a streamed response: `endpoints.py`). One aiperf
process per point (its own sweep mode starts a fresh process per point too, and keeps no
better per-point record). It writes into the point's folder:

- `profile_export_aiperf.json`: the summary read here (`read_measured`): per metric a dict with
  `unit`, `avg` and, for distributions, `p50`/`p90`/`p99`; `request_count` counts the requests
  answered without an error, `error_request_count` the failed ones, `error_summary` lists the
  errors by kind. aiperf exits 0 even when every request failed: `results.invalid_reason`
  judges the figures.
- `profile_export.jsonl`: one line per request (with `error` for a failed one), written as
  requests finish: the progress display counts its lines, and when aiperf gives up without a
  summary (it exits 1 when every request failed) the point's counts come from it.
- `profile_export_aiperf.csv`: the summary as a table (kept for the reader).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.config import BenchmarkConfig
from contract.processes import ManagedProcess
from hpcserve.bench.endpoints import endpoint_kind
from hpcserve.bench.results import Measured, Percentiles

SUMMARY_FILE = "profile_export_aiperf.json"
RECORDS_FILE = "profile_export.jsonl"
STOP_TIMEOUT_S = 10.0
MAX_ERROR_EXAMPLES = 3
# The tokenizer is always a local folder: aiperf's pre-warm of the Hugging Face cache (a
# subprocess importing transformers, 6-13 s a point on 2 cores) has nothing to fetch.
AIPERF_ENV = {"AIPERF_TOKENIZER_SKIP_PRELOAD": "true"}


class AiperfMissing(RuntimeError):
    """aiperf is not installed where the sweep runs."""


def aiperf_command() -> list[str]:
    """How to start aiperf: the `aiperf` beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "aiperf"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("aiperf")
    if found:
        return [found]
    raise AiperfMissing(
        "aiperf is not installed: pip install 'hpcserve[bench]' (or pip install aiperf)"
    )


def aiperf_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aiperf")
    except PackageNotFoundError:
        return None


def server_root(url: str) -> str:
    """aiperf takes the server's root and appends `/v1/chat/completions` itself."""
    return url.rstrip("/").removesuffix("/v1")


def aiperf_argv(
    bench: BenchmarkConfig,
    *,
    url: str,
    model: str,
    tokenizer: str | Path,
    concurrency: int,
    artifact_dir: Path,
    point_index: int = 0,
    aiperf: list[str] | None = None,
    api_key: str | None = None,
) -> list[str]:
    """The `aiperf profile` command line of point `point_index` of `bench`'s sweep. Each point
    draws its prompts with seed + index: the same seed at every point would send a later point
    the earlier one's prompts, all prefix-cache hits. An endpoint without output (embeddings)
    gets no output length, streaming or `ignore_eos` (`hpcserve.bench.endpoints`)."""
    kind = endpoint_kind(bench.endpoint)
    streaming = bench.streaming and kind.produces_tokens
    argv = [
        *(aiperf or ["aiperf"]), "profile",
        "--model", model,
        "--url", server_root(url),
        "--endpoint-type", bench.endpoint,
        "--concurrency", str(concurrency),
        "--synthetic-input-tokens-mean", str(bench.input_tokens.mean),
        "--synthetic-input-tokens-stddev", _number(bench.input_tokens.stddev),
    ]  # fmt: skip
    if kind.produces_tokens:
        argv += ["--output-tokens-mean", str(bench.output_tokens.mean),
                 "--output-tokens-stddev", _number(bench.output_tokens.stddev)]  # fmt: skip
    argv += [
        "--tokenizer", str(tokenizer),
        "--random-seed", str(bench.seed + point_index),
        "--request-timeout-seconds", _number(bench.request_timeout_s),
    ]  # fmt: skip
    if kind.server_token_count(streaming):
        argv.append("--use-server-token-count")
    argv += [
        "--artifact-dir", str(artifact_dir),
        "--ui", "none",
        "--no-server-metrics",
        "--no-gpu-telemetry",
    ]  # fmt: skip
    if streaming:
        argv.append("--streaming")
    asked = bench.requests_at(concurrency)
    if asked is not None:
        # Every request a prompt of its own: a reused prompt would be a prefix-cache hit.
        argv += ["--request-count", str(asked),
                 "--num-dataset-entries", str(asked + bench.warmup_requests)]  # fmt: skip
    else:
        assert bench.duration_s is not None
        argv += ["--benchmark-duration", _number(bench.duration_s)]
    if bench.warmup_requests:
        argv += ["--warmup-request-count", str(bench.warmup_requests)]
    if bench.ignore_eos and kind.produces_tokens:
        argv += ["--extra-inputs", "ignore_eos:true"]
    prefix = bench.shared_prefix
    if prefix is not None:
        if prefix.system_prompt_tokens:
            argv += ["--shared-system-prompt-length", str(prefix.system_prompt_tokens)]
        if prefix.prefix_prompts:
            argv += ["--num-prefix-prompts", str(prefix.prefix_prompts),
                     "--prefix-prompt-length", str(prefix.prefix_tokens)]  # fmt: skip
        if prefix.turns > 1:
            argv += ["--conversation-turn-mean", str(prefix.turns)]
    if api_key is not None:  # aiperf takes it only here (its CLI substitutes no variable)
        argv += ["--api-key", api_key]
    return argv


def shown_argv(argv: list[str]) -> str:
    """`argv` for a log line: an API key replaced by `***`."""
    return " ".join(
        "***" if index and argv[index - 1] == "--api-key" else part
        for index, part in enumerate(argv)
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def run_aiperf(
    argv: list[str],
    log_path: Path,
    artifact_dir: Path,
    on_progress: Callable[[int], None] = lambda done: None,
    tick: Callable[[], object] = lambda: None,
    poll_s: float = 0.5,
) -> int:
    """Run one aiperf process (its output to `log_path`) and return its exit code; while it
    runs, `on_progress(requests finished so far)` and `tick()` (the caller's watch of the
    deployment) every `poll_s`. Stopped by process group if anything raises."""
    process = ManagedProcess.spawn("aiperf", argv, log_path, env={**os.environ, **AIPERF_ENV})
    records = artifact_dir / RECORDS_FILE
    try:
        while process.running():
            on_progress(_count_lines(records))
            tick()
            time.sleep(poll_s)
        on_progress(_count_lines(records))
        return process.popen.returncode
    finally:
        process.stop(STOP_TIMEOUT_S)


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as stream:
            return sum(1 for _ in stream)
    except OSError:
        return 0


def read_measured(artifact_dir: Path, produces_tokens: bool = True) -> Measured | None:
    """The point's figures: from aiperf's summary export, else (aiperf gave up, e.g. because
    every request failed) counted from its per-request records; None when neither exists.
    `produces_tokens` False (embeddings): the output figures are None, not 0."""
    try:
        summary = json.loads((artifact_dir / SUMMARY_FILE).read_text())
        return measured_from_summary(summary, produces_tokens)
    except (OSError, ValueError):
        pass
    try:
        lines = (artifact_dir / RECORDS_FILE).read_text().splitlines()
    except OSError:
        return None
    records = [json.loads(line) for line in lines if line.strip()]
    return measured_from_records(records, produces_tokens)


def measured_from_records(records: list[dict[str, Any]], produces_tokens: bool = True) -> Measured:
    """Counts only (requests, errors, output tokens): what survives when aiperf wrote no
    summary. Rates and latencies stay 0/None: the point is invalid anyway."""
    failed = [record for record in records if record.get("error")]
    tokens = sum(
        int((record.get("metrics") or {}).get("output_sequence_length", {}).get("value") or 0)
        for record in records
        if not record.get("error")
    )
    examples = [_error_text({"error_details": record["error"]}) for record in failed]
    measured = Measured(
        successful=len(records) - len(failed), errors=len(failed),
        error_examples=list(dict.fromkeys(examples))[:MAX_ERROR_EXAMPLES],
        output_tokens=tokens, duration_s=0.0, requests_per_s=0.0, output_tok_s=0.0,
        output_tok_s_per_user=0.0, ttft_ms=None, itl_ms=None, latency_ms=None,
    )  # fmt: skip
    return measured if produces_tokens else measured.without_output()


def measured_from_summary(data: dict[str, Any], produces_tokens: bool = True) -> Measured:
    """Map aiperf's summary (schema 1.x) onto our record. Of an endpoint that generates, a
    metric aiperf did not compute (no output: the server sent no usage) reads as 0, which the
    validity check refuses; TTFT/ITL without streaming read as None. Of one that does not
    (embeddings), the output figures are None: nothing to count, not zero counted."""
    errors = int(_avg(data, "error_request_count"))
    listed = data.get("error_summary") or []
    errors = max(errors, sum(int(item.get("count", 0)) for item in listed))
    per_user = _avg(data, "output_token_throughput_per_user")
    if not per_user:  # not streamed: per-user speed over the whole request
        per_user = _avg(data, "e2e_output_token_throughput")
    measured = Measured(
        successful=int(_avg(data, "request_count")),
        errors=errors,
        error_examples=[_error_text(item) for item in listed[:MAX_ERROR_EXAMPLES]],
        output_tokens=int(_avg(data, "total_output_tokens")),
        duration_s=_avg(data, "benchmark_duration"),
        requests_per_s=_avg(data, "request_throughput"),
        output_tok_s=_avg(data, "output_token_throughput"),
        output_tok_s_per_user=per_user,
        ttft_ms=_percentiles(data, "time_to_first_token"),
        itl_ms=_percentiles(data, "inter_token_latency"),
        latency_ms=_percentiles(data, "request_latency"),
        input_tok_s=_avg_or_none(data, "input_token_throughput"),
        # None without usage numbers (embeddings, a streamed response: the tokenizer counts)
        cached_prompt_pct=_avg_or_none(data, "overall_usage_prompt_cache_read_pct"),
        cancelled=bool(data.get("was_cancelled")),
    )
    return measured if produces_tokens else measured.without_output()


def _avg(data: dict[str, Any], key: str) -> float:
    metric = data.get(key)
    value = metric.get("avg") if isinstance(metric, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0


def _avg_or_none(data: dict[str, Any], key: str) -> float | None:
    metric = data.get(key)
    return _avg(data, key) if isinstance(metric, dict) and "avg" in metric else None


def _percentiles(data: dict[str, Any], key: str) -> Percentiles | None:
    metric = data.get(key)
    if not isinstance(metric, dict) or not all(
        isinstance(metric.get(stat), (int, float)) for stat in ("p50", "p90", "p99")
    ):
        return None
    return Percentiles(p50=metric["p50"], p90=metric["p90"], p99=metric["p99"])


def _error_text(item: dict[str, Any]) -> str:
    details = item.get("error_details") or {}
    message = str(details.get("message") or details.get("type") or "unknown error")
    with contextlib.suppress(ValueError, TypeError, KeyError):  # OpenAI's shape says it best
        message = json.loads(message)["error"]["message"]
    code = details.get("code")
    return f"{code}: {message}" if code else message


def failure_line(log_path: Path) -> str:
    """What aiperf said before it gave up: its last ERROR line, else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if " ERROR " in f" {line} "]
    chosen = (errors or lines or [""])[-1]
    return re.sub(r"^[\d:.]+ +ERROR +", "", chosen).split(" (")[0][:300]

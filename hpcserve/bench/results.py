"""The records of a sweep: one `PointResult` per concurrency, one `BenchRun` per sweep.

A point is valid only if every request it asked for completed, none failed and, for an
endpoint that generates, the server produced output tokens: load generators happily "pass" a
sweep in which every request failed or streamed nothing, and such a point must never reach a
table or a plot as a result. An embeddings point has no output at all: its output figures,
TTFT and ITL are None (shown as a dash, left empty in the CSV), never a made-up 0.

A run folder holds `bench.json` (the `BenchRun`), `bench.csv` (one row per point), the plots
and aiperf's own exports per point under `aiperf/`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from contract.config import BenchmarkConfig
from hpcserve.bench.endpoints import endpoint_kind

RUN_FILE = "bench.json"
TABLE_FILE = "bench.csv"


class Percentiles(BaseModel):
    """A latency distribution in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    p50: float
    p90: float
    p99: float


class Measured(BaseModel):
    """What aiperf measured at one point (read from its summary export)."""

    model_config = ConfigDict(extra="forbid")

    successful: int  # requests answered without an error
    errors: int
    error_examples: list[str] = []
    output_tokens: int | None  # all requests' output tokens; None: the endpoint has none
    duration_s: float
    requests_per_s: float
    output_tok_s: float | None
    output_tok_s_per_user: float | None  # mean over requests of one request's decode speed
    ttft_ms: Percentiles | None  # streaming only
    itl_ms: Percentiles | None  # streaming only
    latency_ms: Percentiles | None
    input_tok_s: float | None = None  # prompt tokens per second, all requests
    cached_prompt_pct: float | None = 0.0  # prompt tokens found in the prefix cache (usage)
    cancelled: bool = False

    def without_output(self) -> Measured:
        """The figures of an endpoint that produces no tokens (embeddings): what counts
        output is None, nothing counted rather than zero counted."""
        return self.model_copy(update={
            "output_tokens": None, "output_tok_s": None, "output_tok_s_per_user": None,
            "ttft_ms": None, "itl_ms": None,
        })  # fmt: skip


class PointResult(BaseModel):
    """One concurrency point of a sweep, judged."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int
    requests_asked: int | None  # None: the point ran for a duration
    completed: int
    errors: int
    output_tokens: int | None  # None: the endpoint produces none (embeddings)
    duration_s: float
    requests_per_s: float
    output_tok_s: float | None
    output_tok_s_per_user: float | None
    output_tok_s_per_gpu: float | None
    ttft_ms: Percentiles | None
    itl_ms: Percentiles | None
    latency_ms: Percentiles | None
    input_tok_s: float | None = None  # None in runs recorded before it was kept
    input_tok_s_per_gpu: float | None = None
    cached_prompt_pct: float | None = 0.0  # prefix-cache hits (%): the KV router's effect
    valid: bool
    reason: str  # why it is invalid; "" when valid
    error_examples: list[str] = []
    artifacts: str  # aiperf's folder of this point, relative to the run folder


class BenchRun(BaseModel):
    """One sweep: what was measured, against what, with which workload."""

    model_config = ConfigDict(extra="forbid")

    label: str
    target: str  # as given: a config path, a job, a URL
    url: str
    model: str
    gpus: int
    gpus_from: str  # how the GPU count was found (the config's worker ranks, --gpus, ...)
    workload: BenchmarkConfig
    aiperf_version: str | None = None
    started: str
    finished: str | None = None
    points: list[PointResult] = []

    @property
    def valid(self) -> bool:
        return bool(self.points) and all(point.valid for point in self.points)

    @property
    def produces_tokens(self) -> bool:
        """Whether the run's endpoint generates (not embeddings): output figures exist."""
        return endpoint_kind(self.workload.endpoint).produces_tokens


def invalid_reason(
    measured: Measured | None,
    requests_asked: int | None,
    failure: str | None = None,
    produces_tokens: bool = True,
) -> str:
    """Why a point cannot count as a measurement; "" when it can. `failure`: aiperf's own
    failure (it exited non-zero), reported first. Every endpoint: each request asked for
    completed, none failed; one that generates (`produces_tokens`) also produced output."""
    reasons = [failure] if failure else []
    if measured is None:
        return "; ".join([*reasons, "aiperf wrote no results"])
    if measured.errors:
        example = f": {measured.error_examples[0]}" if measured.error_examples else ""
        reasons.append(f"{measured.errors} request(s) failed{example}")
    if produces_tokens and not measured.output_tokens:
        reasons.append("zero output tokens")
    if requests_asked is not None and measured.successful < requests_asked:
        reasons.append(f"{measured.successful} of {requests_asked} requests completed")
    elif measured.successful == 0:
        reasons.append("no request completed")
    if measured.cancelled:
        reasons.append("aiperf cancelled the run")
    return "; ".join(reasons)


def judge_point(
    concurrency: int,
    requests_asked: int | None,
    measured: Measured | None,
    gpus: int,
    artifacts: str,
    failure: str | None = None,
    produces_tokens: bool = True,
) -> PointResult:
    """The point's record: its figures (zeros when aiperf measured nothing; None for what the
    endpoint does not produce) and validity."""
    reason = invalid_reason(measured, requests_asked, failure, produces_tokens)
    if measured is None:
        measured = Measured(
            successful=0, errors=0, output_tokens=0, duration_s=0.0, requests_per_s=0.0,
            output_tok_s=0.0, output_tok_s_per_user=0.0, ttft_ms=None, itl_ms=None,
            latency_ms=None,
        )  # fmt: skip
        if not produces_tokens:
            measured = measured.without_output()
    return PointResult(
        concurrency=concurrency,
        requests_asked=requests_asked,
        completed=measured.successful,
        errors=measured.errors,
        output_tokens=measured.output_tokens,
        duration_s=measured.duration_s,
        requests_per_s=measured.requests_per_s,
        output_tok_s=measured.output_tok_s,
        output_tok_s_per_user=measured.output_tok_s_per_user,
        output_tok_s_per_gpu=_per(measured.output_tok_s, gpus),
        ttft_ms=measured.ttft_ms,
        itl_ms=measured.itl_ms,
        latency_ms=measured.latency_ms,
        input_tok_s=measured.input_tok_s,
        input_tok_s_per_gpu=_per(measured.input_tok_s, gpus),
        cached_prompt_pct=measured.cached_prompt_pct,
        valid=not reason,
        reason=reason,
        error_examples=measured.error_examples,
        artifacts=artifacts,
    )


def _per(value: float | None, gpus: int) -> float | None:
    return None if value is None else value / gpus


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (more is better on both),
    ordered by the first coordinate: the frontier of throughput per GPU against throughput
    per user. Of equal points the first one is kept."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i))
    frontier: list[int] = []
    best_y = float("-inf")
    for index in order:
        y = points[index][1]
        if y > best_y:
            frontier.append(index)
            best_y = y
    return sorted(frontier, key=lambda i: (points[i][0], i))


# ----- files ------------------------------------------------------------------------------------
CSV_COLUMNS = [
    "label", "concurrency", "requests_asked", "completed", "errors", "output_tokens",
    "duration_s", "requests_per_s", "output_tok_s", "output_tok_s_per_user",
    "output_tok_s_per_gpu", "input_tok_s", "input_tok_s_per_gpu",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms",
    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "cached_prompt_pct", "valid",
    "reason",
]  # fmt: skip


def csv_row(label: str, point: PointResult) -> dict[str, object]:
    row: dict[str, object] = {"label": label}
    for column in CSV_COLUMNS[1:]:
        name, _, stat = column.removesuffix("_ms").rpartition("_")
        distribution = {"ttft": point.ttft_ms, "itl": point.itl_ms,
                        "latency": point.latency_ms}.get(name)  # fmt: skip
        if name in ("ttft", "itl", "latency"):
            row[column] = "" if distribution is None else round(getattr(distribution, stat), 3)
        else:
            value = getattr(point, column)  # None (not measured): an empty cell, never 0
            if isinstance(value, float):
                value = round(value, 3)
            row[column] = "" if value is None else value
    return row


def write_table(path: Path, runs: Sequence[BenchRun]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for run in runs:
            for point in run.points:
                writer.writerow(csv_row(run.label, point))


def write_run(run: BenchRun, folder: Path) -> None:
    """`bench.json` and `bench.csv`; rewritten after every point, so a stopped sweep keeps
    what it measured."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_FILE}.tmp"
    tmp.write_text(run.model_dump_json(indent=2) + "\n")
    tmp.replace(folder / RUN_FILE)
    write_table(folder / TABLE_FILE, [run])


def load_run(path: str | Path) -> BenchRun:
    """A run from its folder or its `bench.json`; FileNotFoundError/ValueError say which."""
    path = Path(path).expanduser()
    file = path / RUN_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {RUN_FILE} (not a `hpcserve bench` run folder)")
    return BenchRun.model_validate_json(file.read_text())

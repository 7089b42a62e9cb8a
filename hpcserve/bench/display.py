"""What the terminal shows of a sweep: a progress bar per point while aiperf runs (requests
finished of those asked), a line per finished point, and the table of one or more runs.

Off a terminal (a Slurm step's log) the bar is left out and only the lines are printed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from hpcserve.bench.results import BenchRun, Percentiles, PointResult

LOG_WIDTH = 200  # off a terminal (a job's log) the table is not squeezed into 80 columns


def console() -> Console:
    """A console for the table and the lines: the terminal's width, or LOG_WIDTH in a log."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=LOG_WIDTH)


class SweepDisplay:
    """`hpcserve bench`'s `sweep.Progress`: a rich progress bar, one line per point."""

    def __init__(self, total_points: int, out: Console | None = None) -> None:
        self.console = out or console()
        self.total_points = total_points
        self.bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("requests"), TimeElapsedColumn(),
            console=self.console, disable=not self.console.is_terminal, transient=True,
        )  # fmt: skip
        self.task: int | None = None

    def __enter__(self) -> SweepDisplay:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def point_started(self, index: int, concurrency: int, asked: int | None) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(
            f"point {index + 1}/{self.total_points}: concurrency {concurrency}", total=asked
        )
        self.console.print(f"point {index + 1}/{self.total_points}: concurrency {concurrency}, "
                           f"{_asked(asked)}", highlight=False)  # fmt: skip

    def requests_done(self, done: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=done)

    def point_done(self, point: PointResult) -> None:
        verdict = "valid" if point.valid else f"INVALID: {point.reason}"
        if point.output_tok_s is not None and point.output_tok_s_per_user is not None:
            speed = f"{point.output_tok_s:.1f} tok/s, {point.output_tok_s_per_user:.1f} tok/s/user"
        else:  # embeddings: no output, the rate of requests and of prompt tokens
            speed = f"{point.requests_per_s:.2f} req/s, {_number(point.input_tok_s)} in tok/s"
        ttft = f", TTFT p50 {point.ttft_ms.p50:.1f} ms" if point.ttft_ms else ""
        e2e = f", e2e p50 {point.latency_ms.p50:.1f} ms" if point.latency_ms and not ttft else ""
        self.console.print(
            f"  concurrency {point.concurrency}: {point.completed} done, {point.errors} failed, "
            f"{speed}{ttft}{e2e}: {verdict}", highlight=False, soft_wrap=True,
        )  # fmt: skip


def _asked(asked: int | None) -> str:
    return f"{asked} requests" if asked is not None else "for the set duration"


def _ms(stats: Percentiles | None, stat: str) -> str:
    return "-" if stats is None else f"{getattr(stats, stat):.1f}"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p50_p99(stats: Percentiles | None) -> str:
    return f"{_ms(stats, 'p50')}/{_ms(stats, 'p99')}"


# The table's columns after run/conc/done/err: a header, the point's figure, and how it is
# written. A column is left out when no point of the runs has the figure (embeddings: no
# output, TTFT or ITL; runs recorded before input tokens/s was kept); a point without it shows
# a dash.
COLUMNS: tuple[tuple[str, Callable[[PointResult], Any], Callable[[Any], str]], ...] = (
    ("tok/s", lambda p: p.output_tok_s, _number),
    ("tok/s/user", lambda p: p.output_tok_s_per_user, _number),
    ("tok/s/GPU", lambda p: p.output_tok_s_per_gpu, _number),
    ("in tok/s", lambda p: p.input_tok_s, _number),
    ("req/s", lambda p: p.requests_per_s, lambda rate: f"{rate:.2f}"),
    ("TTFT p50/p99 ms", lambda p: p.ttft_ms, _p50_p99),
    ("ITL p50/p99 ms", lambda p: p.itl_ms, _p50_p99),
    ("e2e p50/p99 ms", lambda p: p.latency_ms, _p50_p99),
)
ALWAYS = ("req/s", "e2e p50/p99 ms")


def table_columns(runs: Sequence[BenchRun]) -> list[str]:
    """The headers of the figures any point of `runs` has (req/s and e2e latency always)."""
    points = [point for run in runs for point in run.points]
    return [header for header, value, _ in COLUMNS
            if header in ALWAYS or any(value(point) is not None for point in points)]  # fmt: skip


def runs_table(runs: Sequence[BenchRun]) -> Table:
    """One row per point of every run; only the columns some point has a figure for."""
    shown = table_columns(runs)
    table = Table(title="hpcserve bench", show_lines=False)
    for header in ("run", "conc", "done/asked", "err", *shown, "valid"):
        table.add_column(header, justify="left" if header in ("run", "valid") else "right")
    cells = [(value, text) for header, value, text in COLUMNS if header in shown]
    for run in runs:
        for point in run.points:
            asked = "-" if point.requests_asked is None else str(point.requests_asked)
            table.add_row(
                run.label, str(point.concurrency), f"{point.completed}/{asked}",
                str(point.errors), *(text(value(point)) for value, text in cells),
                "yes" if point.valid else f"INVALID: {point.reason}",
            )  # fmt: skip
    return table

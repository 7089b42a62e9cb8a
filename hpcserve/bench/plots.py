"""The PNGs of one run or of several overlaid (`hpcserve bench compare`).

- `pareto.png`: output tokens/s per GPU against output tokens/s per user, one colour per run,
  each point labelled with its concurrency and the run's pareto frontier drawn through its
  valid points (the seed's agg-vs-disagg picture: up and to the right is better). Invalid
  points are grey crosses, never on a frontier.
  Embedding runs have no output tokens: when every run is one, the axes are input tokens/s
  per GPU against requests/s per user (req/s / concurrency) instead; beside generating runs
  they are left off the picture (the table has them).
- `latency.png`: TTFT, inter-token latency and end-to-end latency against concurrency, p50
  solid and p99 dashed; a panel no point has figures for (embeddings: TTFT, ITL) is left out.

Figures are built without pyplot's global state (matplotlib's Agg canvas: no display needed)
and returned before saving, so tests can read the artists' data as well as the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hpcserve.bench.results import BenchRun, Percentiles, PointResult, pareto_frontier

PARETO_FILE = "pareto.png"
LATENCY_FILE = "latency.png"
DPI = 100
INVALID_COLOR = "#888888"
# One colour per run, distinct from each other and from the grey of invalid points.
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
              "#17becf"]  # fmt: skip


def run_color(index: int) -> str:
    return RUN_COLORS[index % len(RUN_COLORS)]


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _output_xy(point: PointResult) -> tuple[float, float]:
    return point.output_tok_s_per_user or 0.0, point.output_tok_s_per_gpu or 0.0


def _input_xy(point: PointResult) -> tuple[float, float]:
    return point.requests_per_s / point.concurrency, point.input_tok_s_per_gpu or 0.0


def pareto_figure(runs: Sequence[BenchRun]) -> Figure:
    figure = _figure(8, 6)
    axes = figure.add_subplot()
    invalid_labelled = False
    by_output = any(run.produces_tokens for run in runs)
    xy_of = _output_xy if by_output else _input_xy
    for index, run in enumerate(runs):
        if run.produces_tokens != by_output:
            continue  # an embedding run beside generating ones: not on these axes
        color = run_color(index)
        valid = [point for point in run.points if point.valid]
        xy = [xy_of(point) for point in valid]
        if xy:
            axes.scatter([x for x, _ in xy], [y for _, y in xy], s=49, color=color, zorder=3,
                         label=f"{run.label} ({run.gpus} GPU)", gid=f"points-{index}")  # fmt: skip
            frontier = pareto_frontier(xy)
            axes.plot([xy[i][0] for i in frontier], [xy[i][1] for i in frontier], color=color,
                      linewidth=1.5, zorder=2, gid=f"frontier-{index}")  # fmt: skip
        for point, (x, y) in zip(valid, xy, strict=True):
            _label_point(axes, x, y, point)
        bad = [xy_of(point) for point in run.points if not point.valid]
        if bad:
            axes.scatter([x for x, _ in bad], [y for _, y in bad], marker="x", s=49,
                         color=INVALID_COLOR, zorder=3, gid=f"invalid-{index}",
                         label=None if invalid_labelled else "invalid point")  # fmt: skip
            invalid_labelled = True
    unit = "output tokens/s" if by_output else "requests/s"
    axes.set_xlabel(f"{unit} per user")
    axes.set_ylabel("output tokens/s per GPU" if by_output else "input tokens/s per GPU")
    axes.set_title("Throughput per GPU against throughput per user (pareto frontier)")
    # From zero (ratios read true), with room right and above for the last labels.
    plotted = [xy_of(p) for run in runs if run.produces_tokens == by_output for p in run.points]
    xs = [x for x, _ in plotted] or [1.0]
    ys = [y for _, y in plotted] or [1.0]
    axes.set_xlim(0, max(max(xs), 1e-9) * 1.15)
    axes.set_ylim(0, max(max(ys), 1e-9) * 1.15)
    axes.grid(True, alpha=0.3)
    if runs:
        axes.legend(loc="best", fontsize=9)
    return figure


def _label_point(axes: Axes, x: float, y: float, point: PointResult) -> None:
    axes.annotate(f"c{point.concurrency}", (x, y), textcoords="offset points", xytext=(5, 5),
                  fontsize=8)  # fmt: skip


LATENCIES = (
    ("ttft_ms", "time to first token (ms)"),
    ("itl_ms", "inter-token latency (ms)"),
    ("latency_ms", "end-to-end latency (ms)"),
)


def latency_figure(runs: Sequence[BenchRun]) -> Figure:
    shown = [(field, title) for field, title in LATENCIES if field == "latency_ms" or any(
        getattr(point, field) is not None for run in runs for point in run.points)]  # fmt: skip
    figure = _figure(14 * len(shown) / len(LATENCIES), 4.5)
    panels = figure.subplots(1, len(shown), squeeze=False)[0]
    for axes, (field, title) in zip(panels, shown, strict=True):
        for index, run in enumerate(runs):
            color = run_color(index)
            points = [p for p in run.points if p.valid and getattr(p, field) is not None]
            points.sort(key=lambda p: p.concurrency)
            xs = [p.concurrency for p in points]
            stats: list[Percentiles] = [getattr(p, field) for p in points]
            if not xs:
                continue
            axes.plot(xs, [s.p50 for s in stats], color=color, marker="o", markersize=6,
                      label=f"{run.label} p50", gid=f"{field}-p50-{index}")  # fmt: skip
            axes.plot(xs, [s.p99 for s in stats], color=color, linestyle="--", marker="^",
                      markersize=5, label=f"{run.label} p99",
                      gid=f"{field}-p99-{index}")  # fmt: skip
        concurrencies = sorted({p.concurrency for run in runs for p in run.points})
        axes.set_xscale("log", base=2)
        axes.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axes.minorticks_off()
        axes.set_xlabel("concurrency")
        axes.set_title(title)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    return figure


def write_plots(runs: Sequence[BenchRun], folder: Path) -> list[Path]:
    """`pareto.png` and `latency.png` in `folder`."""
    written = []
    for name, build in ((PARETO_FILE, pareto_figure), (LATENCY_FILE, latency_figure)):
        path = folder / name
        build(runs).savefig(path, dpi=DPI)
        written.append(path)
    return written

"""The PNGs show the points: the figures' artists hold the data, and the saved pixels carry
each run's colour where its points are (and nowhere a point is not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import colors
from matplotlib import image as mpimg
from matplotlib.axes import Axes

from contract.config import BenchmarkConfig
from hpcserve.bench.aiperf_run import read_measured
from hpcserve.bench.plots import (
    DPI,
    INVALID_COLOR,
    latency_figure,
    pareto_figure,
    run_color,
    write_plots,
)
from hpcserve.bench.results import BenchRun, Percentiles, PointResult, judge_point

DATA = Path(__file__).parent / "data"


def point(
    concurrency: int, per_user: float, per_gpu: float, valid: bool = True, ms: float = 10.0
) -> PointResult:
    latency = Percentiles(p50=ms * concurrency, p90=1.2 * ms * concurrency,
                          p99=1.5 * ms * concurrency)  # fmt: skip
    return PointResult(
        concurrency=concurrency, requests_asked=10, completed=10, errors=0, output_tokens=100,
        duration_s=1.0, requests_per_s=1.0, output_tok_s=per_gpu, output_tok_s_per_user=per_user,
        output_tok_s_per_gpu=per_gpu, ttft_ms=latency, itl_ms=latency, latency_ms=latency,
        valid=valid, reason="" if valid else "1 request(s) failed", artifacts="x",
    )  # fmt: skip


def run(label: str, points: list[PointResult]) -> BenchRun:
    return BenchRun(label=label, target="t", url="u", model="m", gpus=1, gpus_from="test",
                    workload=BenchmarkConfig(), started="t0", points=points)  # fmt: skip


# agg: c1..c8 trade per-user speed for per-GPU throughput; c4' is beaten by c4 (off frontier)
AGG = run("agg", [point(1, 100, 100), point(2, 90, 170), point(4, 70, 300),
                  point(8, 40, 420), point(3, 60, 250)])  # fmt: skip
DISAGG = run("disagg", [point(1, 120, 80, ms=4), point(4, 95, 260, ms=4),
                        point(16, 30, 500, ms=4), point(8, 20, 200, valid=False)])  # fmt: skip


def by_gid(axes: Axes, gid: str):
    found = [a for a in [*axes.collections, *axes.lines] if a.get_gid() == gid]
    assert len(found) == 1, f"no single artist {gid!r}"
    return found[0]


def pixels_near(image: np.ndarray, axes: Axes, x: float, y: float, radius: int = 3):
    """The saved image's pixels around data point (x, y) of `axes` (rows count from the top)."""
    px, py = axes.transData.transform((x, y))
    row, col = round(image.shape[0] - py), round(px)
    return image[row - radius : row + radius + 1, col - radius : col + radius + 1, :3]


def has_color(pixels: np.ndarray, color: str, tolerance: float = 0.08) -> bool:
    rgb = np.array(colors.to_rgb(color))
    return bool((np.abs(pixels - rgb).max(axis=-1) < tolerance).any())


@pytest.fixture(scope="module")
def pareto(tmp_path_factory: pytest.TempPathFactory):
    figure = pareto_figure([AGG, DISAGG])
    path = tmp_path_factory.mktemp("plots") / "pareto.png"
    figure.savefig(path, dpi=DPI)
    return figure, mpimg.imread(path)


def test_pareto_artists_hold_the_valid_points_and_the_frontiers(pareto) -> None:
    figure, _ = pareto
    axes = figure.axes[0]
    agg = by_gid(axes, "points-0").get_offsets()
    assert sorted(map(tuple, agg)) == sorted((p.output_tok_s_per_user, p.output_tok_s_per_gpu)
                                             for p in AGG.points)  # fmt: skip
    frontier = by_gid(axes, "frontier-0")
    assert list(zip(frontier.get_xdata(), frontier.get_ydata(), strict=True)) == [
        (40, 420),
        (70, 300),
        (90, 170),
        (100, 100),
    ]  # (60, 250) is beaten by (70, 300)
    disagg_frontier = by_gid(axes, "frontier-1")
    assert list(disagg_frontier.get_xdata()) == [30, 95, 120]  # the invalid point is not on it
    assert [tuple(xy) for xy in by_gid(axes, "invalid-1").get_offsets()] == [(20, 200)]
    labels = [text.get_text() for text in axes.texts]
    assert sorted(labels) == sorted(f"c{p.concurrency}" for r in (AGG, DISAGG)
                                    for p in r.points if p.valid)  # fmt: skip
    assert [t.get_text() for t in axes.get_legend().get_texts()][:2] == [
        "agg (1 GPU)",
        "disagg (1 GPU)",
    ]


def test_pareto_png_shows_each_point_in_its_runs_colour(pareto) -> None:
    figure, image = pareto
    axes = figure.axes[0]
    assert image.shape[:2] == (600, 800)
    for index, current in enumerate((AGG, DISAGG)):
        for p in current.points:
            near = pixels_near(image, axes, p.output_tok_s_per_user, p.output_tok_s_per_gpu)
            if p.valid:
                assert has_color(near, run_color(index)), (current.label, p.concurrency)
            else:
                assert has_color(near, INVALID_COLOR), (current.label, p.concurrency)
                assert not has_color(near, run_color(index))
    # where no point (and no frontier) is, neither run's colour
    empty = pixels_near(image, axes, 10, 30, radius=5)
    assert not has_color(empty, run_color(0)) and not has_color(empty, run_color(1))


def test_latency_figure_plots_p50_and_p99_against_concurrency(tmp_path: Path) -> None:
    figure = latency_figure([AGG, DISAGG])
    path = tmp_path / "latency.png"
    figure.savefig(path, dpi=DPI)
    image = mpimg.imread(path)
    ttft, itl, e2e = figure.axes
    assert [a.get_title() for a in figure.axes] == [
        "time to first token (ms)",
        "inter-token latency (ms)",
        "end-to-end latency (ms)",
    ]
    line = by_gid(ttft, "ttft_ms-p50-0")
    assert list(line.get_xdata()) == [1, 2, 3, 4, 8]  # sorted by concurrency
    assert list(line.get_ydata()) == [10, 20, 30, 40, 80]
    assert list(by_gid(e2e, "latency_ms-p99-1").get_xdata()) == [1, 4, 16]  # invalid left out
    for axes, field in ((ttft, "ttft_ms"), (itl, "itl_ms"), (e2e, "latency_ms")):
        for index, current in enumerate((AGG, DISAGG)):
            for p in current.points:
                if p.valid:
                    stats = getattr(p, field)
                    near = pixels_near(image, axes, p.concurrency, stats.p50)
                    assert has_color(near, run_color(index)), (field, current.label, p)


def test_a_recorded_run_is_plotted_into_the_run_folder(tmp_path: Path) -> None:
    points = [judge_point(c, 12, read_measured(DATA / f"stream_c{c}"), 1, f"c{c}")
              for c in (1, 4)]  # fmt: skip
    recorded = run("mocker", points)
    written = write_plots([recorded], tmp_path)
    assert [path.name for path in written] == ["pareto.png", "latency.png"]
    figure = pareto_figure([recorded])
    figure.savefig(tmp_path / "again.png", dpi=DPI)
    image = mpimg.imread(tmp_path / "again.png")
    saved = mpimg.imread(written[0])
    assert saved.shape == image.shape
    for p in points:
        near = pixels_near(saved, figure.axes[0], p.output_tok_s_per_user, p.output_tok_s_per_gpu)
        assert has_color(near, run_color(0))


def embed_point(concurrency: int, per_gpu: float, valid: bool = True) -> PointResult:
    latency = Percentiles(p50=5.0 * concurrency, p90=6.0 * concurrency, p99=8.0 * concurrency)
    return PointResult(
        concurrency=concurrency, requests_asked=8, completed=8, errors=0, output_tokens=None,
        duration_s=1.0, requests_per_s=100.0 * concurrency ** 0.5, output_tok_s=None,
        output_tok_s_per_user=None, output_tok_s_per_gpu=None, ttft_ms=None, itl_ms=None,
        latency_ms=latency, input_tok_s=per_gpu, input_tok_s_per_gpu=per_gpu, valid=valid,
        reason="" if valid else "1 request(s) failed", artifacts="x", cached_prompt_pct=None,
    )  # fmt: skip


EMBED = BenchRun(label="embed", target="t", url="u", model="m", gpus=1, gpus_from="test",
                 workload=BenchmarkConfig(endpoint="embeddings"), started="t0",
                 points=[embed_point(1, 3000), embed_point(2, 4200), embed_point(4, 5000),
                         embed_point(8, 4000, valid=False)])  # fmt: skip


def test_pareto_of_embedding_runs_is_input_throughput_against_requests_per_user(
    tmp_path: Path,
) -> None:
    figure = pareto_figure([EMBED])
    axes = figure.axes[0]
    assert axes.get_ylabel() == "input tokens/s per GPU"
    assert axes.get_xlabel() == "requests/s per user"
    offsets = by_gid(axes, "points-0").get_offsets()
    valid = [p for p in EMBED.points if p.valid]
    assert [tuple(xy) for xy in offsets] == [
        (p.requests_per_s / p.concurrency, p.input_tok_s_per_gpu) for p in valid
    ]
    bad = by_gid(axes, "invalid-0").get_offsets()
    assert [tuple(xy) for xy in bad] == [(100.0 * 8**0.5 / 8, 4000)]
    figure.savefig(tmp_path / "pareto.png", dpi=DPI)
    image = mpimg.imread(tmp_path / "pareto.png")
    for p in valid:
        near = pixels_near(image, axes, p.requests_per_s / p.concurrency, p.input_tok_s_per_gpu)
        assert has_color(near, run_color(0)), p.concurrency


def test_an_embedding_run_beside_generating_runs_is_left_off_the_pareto() -> None:
    axes = pareto_figure([AGG, EMBED]).axes[0]
    assert axes.get_ylabel() == "output tokens/s per GPU"
    gids = {a.get_gid() for a in [*axes.collections, *axes.lines]}
    assert "points-0" in gids and not {"points-1", "frontier-1", "invalid-1"} & gids


def test_latency_figure_of_embeddings_has_only_the_end_to_end_panel(tmp_path: Path) -> None:
    figure = latency_figure([EMBED])
    assert [a.get_title() for a in figure.axes] == ["end-to-end latency (ms)"]
    line = by_gid(figure.axes[0], "latency_ms-p50-0")
    assert list(line.get_xdata()) == [1, 2, 4] and list(line.get_ydata()) == [5, 10, 20]
    assert len(latency_figure([AGG, EMBED]).axes) == 3  # the chat run has TTFT and ITL
    assert [p.name for p in write_plots([EMBED], tmp_path)] == ["pareto.png", "latency.png"]

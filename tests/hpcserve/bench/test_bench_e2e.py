"""`hpcserve bench CONFIG` end to end: the deployment started here, aiperf at each
concurrency against it, the run folder, the deployment stopped after; then `bench compare`
of the two runs. Short on purpose (few requests, short outputs): it checks the tool, not the
server's speed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from matplotlib import colors
from matplotlib import image as mpimg

from hpcserve.bench.plots import run_color
from hpcserve.bench.results import BenchRun, load_run
from tests.hpcserve.up_helpers import hpcserve_bench, processes_mentioning

pytestmark = pytest.mark.e2e



def check_short_run(run: BenchRun, concurrencies: list[int], requests: int, osl: int) -> None:
    assert run.valid, [p.reason for p in run.points]
    assert [p.concurrency for p in run.points] == concurrencies
    for point in run.points:
        assert (point.completed, point.errors, point.requests_asked) == (requests, 0, requests)
        assert point.output_tokens == requests * osl  # ignore_eos: exactly the asked length
        assert point.output_tok_s > 0 and point.output_tok_s_per_user > 0
        assert point.ttft_ms is not None and point.itl_ms is not None
        assert 0 < point.ttft_ms.p50 <= point.ttft_ms.p99 <= point.latency_ms.p99
        assert point.output_tok_s_per_gpu == pytest.approx(point.output_tok_s / run.gpus)


@pytest.fixture(scope="module")
def mocker_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("bench-mocker")
    result = hpcserve_bench(
        "configs/local-mocker-kv.yaml", "--set", "workers.0.count=2",
        "--set", "engine.mocker.speedup=5", "--set", f"run_dir={base / 'deployment'}",
        "--concurrency", "1,2", "--requests", "6", "--isl", "32", "--osl", "8",
        "--label", "mocker", "--out", str(base / "run"),
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return base / "run", base / "deployment", result.stdout


def test_mocker_sweep_of_two_concurrencies(mocker_run: tuple[Path, Path, str]) -> None:
    folder, deployment, stdout = mocker_run
    run = load_run(folder)
    check_short_run(run, [1, 2], requests=6, osl=8)
    assert run.label == "mocker" and run.model == "SmolLM2-135M-Instruct"
    assert run.gpus == 2 and run.gpus_from == "the deployment's worker ranks"
    assert run.url.startswith("http://127.0.0.1:") and run.url.endswith("/v1")
    assert run.target == "configs/local-mocker-kv.yaml" and run.finished
    for point in run.points:
        assert (folder / point.artifacts / "profile_export_aiperf.json").is_file()
        # fresh prompts at each point: only the chat template's first block is a cache hit
        # (a point re-sending the last one's prompts would be at 70 % and more)
        assert point.cached_prompt_pct < 50, point
    rows = list(csv.DictReader((folder / "bench.csv").open()))
    assert [(r["concurrency"], r["valid"]) for r in rows] == [("1", "True"), ("2", "True")]
    assert "point 1/2: concurrency 1, 6 requests" in stdout
    assert "concurrency 2: 6 done, 0 failed" in stdout
    assert f"results: {folder}/bench.json" in stdout
    # the deployment was started for the sweep and is gone after it
    assert (deployment / "logs" / "frontend.log").is_file()
    assert processes_mentioning(str(deployment)) == []


@pytest.fixture(scope="module")
def model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("bench-model")
    result = hpcserve_bench(
        "configs/local-agg.yaml", "--set", f"run_dir={base / 'deployment'}",
        "--concurrency", "2", "--requests", "4", "--isl", "32", "--osl", "8",
        "--label", "smollm2", "--out", str(base / "run"),
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert processes_mentioning(str(base / "deployment")) == []
    return base / "run"


def test_default_model_short_sweep(model_run: Path) -> None:
    run = load_run(model_run)
    check_short_run(run, [2], requests=4, osl=8)
    assert run.gpus == 1 and run.label == "smollm2"


def test_compare_overlays_both_runs(
    mocker_run: tuple[Path, Path, str], model_run: Path, tmp_path: Path
) -> None:
    result = hpcserve_bench("compare", str(mocker_run[0]), str(model_run / "bench.json"),
                            "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [(r["label"], r["concurrency"]) for r in rows] == [
        ("mocker", "1"),
        ("mocker", "2"),
        ("smollm2", "2"),
    ]
    image = mpimg.imread(tmp_path / "pareto.png")[:, :, :3]
    for index in (0, 1):  # both runs' colours are in the picture
        rgb = colors.to_rgb(run_color(index))
        assert (abs(image - rgb).max(axis=-1) < 0.05).sum() > 20, run_color(index)
    assert "compared 2 runs" in result.stdout

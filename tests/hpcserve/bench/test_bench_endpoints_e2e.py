"""`hpcserve bench` on the endpoints beyond chat, end to end with the real aiperf against mocker
deployments: an embeddings sweep (no output tokens: valid on its own rules, its own table
columns), a streamed Responses API sweep (aiperf reads our typed SSE events), `bench compare`
of embedding runs, and the refusal of a target that does not serve the endpoint. Short on
purpose (a few requests per point): it checks the tool, not the server's speed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from hpcserve.bench.results import load_run
from tests.hpcserve.up_helpers import hpcserve_bench, processes_mentioning, started

pytestmark = pytest.mark.e2e

EMBED_MOCKER = ["configs/local-embed.yaml", "--set", "engine.kind=mocker"]


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("bench-embed")
    result = hpcserve_bench(
        *EMBED_MOCKER, "--set", f"run_dir={base / 'deployment'}", "--endpoint", "embeddings",
        "--concurrency", "1,2", "--requests", "6", "--isl", "32", "--label", "embed",
        "--out", str(base / "run"),
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return base / "run", base / "deployment", result.stdout


def test_embeddings_sweep_is_valid_without_output_tokens(
    embed_run: tuple[Path, Path, str],
) -> None:
    folder, deployment, stdout = embed_run
    run = load_run(folder)
    assert run.valid, [p.reason for p in run.points]
    assert run.workload.endpoint == "embeddings" and not run.produces_tokens
    assert [p.concurrency for p in run.points] == [1, 2]
    for point in run.points:
        assert (point.completed, point.errors, point.requests_asked) == (6, 0, 6)
        assert point.output_tokens is None and point.output_tok_s is None
        assert point.ttft_ms is None and point.itl_ms is None
        assert point.latency_ms is not None and 0 < point.latency_ms.p50 <= point.latency_ms.p99
        assert point.requests_per_s > 0
        assert point.input_tok_s is not None and point.input_tok_s > 0
    header = next(line for line in stdout.splitlines() if "done/asked" in line)
    assert "in tok/s" in header and "req/s" in header and "e2e p50/p99 ms" in header
    assert "TTFT" not in header and "ITL" not in header and "tok/s/user" not in header
    assert "concurrency 2: 6 done, 0 failed" in stdout and "in tok/s" in stdout
    rows = list(csv.DictReader((folder / "bench.csv").open()))
    assert [(r["output_tokens"], r["ttft_p50_ms"], r["valid"]) for r in rows] == [
        ("", "", "True"), ("", "", "True")]  # fmt: skip
    assert (folder / "pareto.png").is_file() and (folder / "latency.png").is_file()
    assert processes_mentioning(str(deployment)) == []


def test_compare_of_embedding_runs(embed_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    folder = embed_run[0]
    result = hpcserve_bench("compare", str(folder), str(folder / "bench.json"),
                            "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [(r["label"], r["concurrency"]) for r in rows] == [
        ("embed", "1"), ("embed", "2"), ("embed #2", "1"), ("embed #2", "2")]  # fmt: skip
    assert "in tok/s" in result.stdout and "TTFT" not in result.stdout
    assert (tmp_path / "pareto.png").is_file() and (tmp_path / "latency.png").is_file()


def test_streamed_responses_sweep(tmp_path: Path) -> None:
    result = hpcserve_bench(
        "configs/local-mocker-kv.yaml", "--set", "workers.0.count=1",
        "--set", "workers.0.per_process=1", "--set", "engine.mocker.speedup=5",
        "--set", f"run_dir={tmp_path / 'deployment'}", "--endpoint", "responses",
        "--concurrency", "2", "--requests", "6", "--isl", "32", "--osl", "8",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    run = load_run(tmp_path / "run")
    assert run.valid, [p.reason for p in run.points]
    assert run.workload.endpoint == "responses" and run.workload.streaming
    assert [p.concurrency for p in run.points] == [2]  # one point: the sweep is tested above
    for point in run.points:
        assert (point.completed, point.errors) == (6, 0)
        # counted by aiperf's tokenizer from the streamed text (see hpcserve.bench.endpoints)
        assert point.output_tokens and point.output_tokens > 0 and point.output_tok_s > 0
        assert point.ttft_ms is not None and point.itl_ms is not None
        assert 0 < point.ttft_ms.p50 <= point.latency_ms.p99
    assert processes_mentioning(str(tmp_path / "deployment")) == []


def test_a_config_of_the_other_task_is_refused_before_it_starts(tmp_path: Path) -> None:
    result = hpcserve_bench(*EMBED_MOCKER, "--set", f"run_dir={tmp_path / 'deployment'}",
                            "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 1, result.stdout
    for named in ("--endpoint chat", "benchmark.endpoint", "model.task: generate",
                  "model.task: embed", "--endpoint embeddings"):  # fmt: skip
        assert named in result.stderr, named
    assert not (tmp_path / "deployment" / "logs").exists()  # nothing was started
    assert not (tmp_path / "run").exists()


def test_a_url_of_the_other_task_is_refused_before_aiperf(tmp_path: Path) -> None:
    with started([*EMBED_MOCKER, "--set", "frontend.port=0"], tmp_path / "deployment") as up:
        for endpoint in ("chat", "responses"):
            result = hpcserve_bench(up.base_url, "--endpoint", endpoint, "--requests", "2",
                                    "--out", str(tmp_path / endpoint))  # fmt: skip
            assert result.returncode == 1, result.stdout
            assert f"--endpoint {endpoint} (benchmark.endpoint)" in result.stderr
            assert "answered 400" in result.stderr and "model.task: embed" in result.stderr
            assert not (tmp_path / endpoint).exists()

"""`hpcserve bench` on the command line: bad options refused naming the field (exit 2), a
target that is not there (exit 1), and an invalid sweep failing loudly (exit 1). Nothing here
starts aiperf: where a sweep is needed, the sweep returns a run judged from recorded data."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from contract.config import BenchmarkConfig
from hpcserve.bench import sweep
from hpcserve.bench.aiperf_run import read_measured
from hpcserve.bench.results import BenchRun, judge_point
from hpcserve.cli import app
from slurm.state import write_state

DATA = Path(__file__).parent / "data"
URL = "http://127.0.0.1:9/v1"  # nothing listens: every case here fails before contacting it


def bench(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--concurrency", "1,x"], "--concurrency"),
        (["--concurrency", "1,0"], "benchmark.concurrency.1"),
        (["--isl", "0"], "benchmark.input_tokens.mean"),
        (["--requests", "3", "--duration", "5"], "benchmark.duration_s"),
        (["--endpoint", "rerank"], "benchmark.endpoint"),
        (["--endpoint", "embeddings", "--turns", "2"], "benchmark.shared_prefix.turns"),
        (["--endpoint", "embeddings", "--system-prompt-tokens", "64"],
         "benchmark.shared_prefix.system_prompt_tokens"),
        (["--system-prompt-tokens", "10", "--prefix-prompts", "2", "--prefix-tokens", "5"],
         "benchmark.shared_prefix.prefix_prompts"),
        (["--set", "benchmark.then=later"], "benchmark.then"),
    ],
)  # fmt: skip
def test_bad_options_name_the_field(args: list[str], named: str) -> None:
    result = bench(URL, *args)
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_a_job_that_is_not_ready(tmp_path: Path) -> None:
    write_state(tmp_path, "STARTING", stage="workers")
    result = bench(str(tmp_path))
    assert result.exit_code == 1
    assert "is STARTING, not READY" in result.output
    assert bench("no-such-job").exit_code == 1


def test_a_url_without_a_tokenizer(tmp_path: Path) -> None:
    result = bench(URL, "--tokenizer", str(tmp_path), "--model", "m")
    assert result.exit_code == 1
    assert "no tokenizer in" in result.output


def test_an_invalid_point_fails_the_command(monkeypatch, tmp_path: Path) -> None:
    """The sweep (replaced: it returns what the recorded exports judge) had one bad point."""
    seen: dict[str, object] = {}

    def fake_url_target(url, bench_config, model, tokenizer):
        seen["bench"] = bench_config
        return sweep.Target(url, url, "m", tmp_path, 1, "test", "recorded", bench_config)

    def fake_run_sweep(target, folder, progress):
        points = [judge_point(4, 12, read_measured(DATA / "stream_c4"), 1, "c4"),
                  judge_point(2, 8, read_measured(DATA / "errors_c2"), 1, "c2")]  # fmt: skip
        return BenchRun(label=target.label, target=target.given, url=target.url, model="m",
                        gpus=1, gpus_from="test", workload=target.bench, started="t",
                        points=points)  # fmt: skip

    monkeypatch.setattr(sweep, "url_target", fake_url_target)
    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    result = bench(URL, "--concurrency", "4,2", "--osl", "16", "--out", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert "1 of 2 points INVALID: concurrency 2: 4 request(s) failed" in result.output
    assert isinstance(seen["bench"], BenchmarkConfig)
    assert seen["bench"].concurrency == [4, 2] and seen["bench"].output_tokens.mean == 16


def test_compare_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    result = bench("compare", str(tmp_path))
    assert result.exit_code == 2
    assert "not a `hpcserve bench` run folder" in result.output

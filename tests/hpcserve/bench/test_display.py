"""The sweep's table and per-point lines: only the figures a run has, a dash for a point
without one (embeddings: no output tokens, TTFT or ITL)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from contract.config import BenchmarkConfig
from hpcserve.bench.aiperf_run import read_measured
from hpcserve.bench.display import SweepDisplay, runs_table, table_columns
from hpcserve.bench.results import BenchRun, judge_point

DATA = Path(__file__).parent / "data"


def recorded(folder: str, endpoint: str, label: str, asked: int) -> BenchRun:
    produces = endpoint != "embeddings"
    point = judge_point(2, asked, read_measured(DATA / folder, produces), 1, folder,
                        produces_tokens=produces)  # fmt: skip
    return BenchRun(label=label, target="u", url="u", model="m", gpus=1, gpus_from="t",
                    workload=BenchmarkConfig(endpoint=endpoint), started="t0",
                    points=[point])  # fmt: skip


def rendered(runs: list[BenchRun]) -> list[str]:
    out = Console(width=250, record=True)
    out.print(runs_table(runs))
    return out.export_text().splitlines()


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("│")[1:-1]]


def test_an_embeddings_table_has_its_own_columns_only() -> None:
    embed = recorded("embed_c2", "embeddings", "embed", 8)
    assert table_columns([embed]) == ["in tok/s", "req/s", "e2e p50/p99 ms"]
    lines = rendered([embed])
    header = next(line for line in lines if "conc" in line)
    assert "TTFT" not in header and "ITL" not in header and "tok/s/user" not in header
    row = cells(next(line for line in lines if line.startswith("│ embed")))
    point = embed.points[0]
    assert row == ["embed", "2", "8/8", "0", f"{point.input_tok_s:.1f}",
                   f"{point.requests_per_s:.2f}",
                   f"{point.latency_ms.p50:.1f}/{point.latency_ms.p99:.1f}", "yes"]  # fmt: skip


def test_a_mixed_table_shows_a_dash_where_a_run_has_no_figure() -> None:
    embed = recorded("embed_c2", "embeddings", "embed", 8)
    chat = recorded("stream_c4", "chat", "chat", 12)
    columns = table_columns([chat, embed])
    assert columns[:3] == ["tok/s", "tok/s/user", "tok/s/GPU"]
    assert "TTFT p50/p99 ms" in columns and "ITL p50/p99 ms" in columns
    lines = rendered([chat, embed])
    embed_row = cells(next(line for line in lines if line.startswith("│ embed")))
    by_header = dict(zip(["run", "conc", "done/asked", "err", *columns, "valid"], embed_row,
                         strict=True))  # fmt: skip
    for header in ("tok/s", "tok/s/user", "tok/s/GPU"):
        assert by_header[header] == "-", header
    assert by_header["TTFT p50/p99 ms"] == by_header["ITL p50/p99 ms"] == "-/-"
    chat_row = dict(zip(["run", "conc", "done/asked", "err", *columns, "valid"],
                        cells(next(line for line in lines if line.startswith("│ chat"))),
                        strict=True))  # fmt: skip
    assert chat_row["tok/s"] != "-" and chat_row["TTFT p50/p99 ms"] != "-/-"


def test_the_point_line_of_an_embeddings_point() -> None:
    embed = recorded("embed_c2", "embeddings", "embed", 8)
    out = Console(width=250, record=True)
    SweepDisplay(1, out).point_done(embed.points[0])
    line = out.export_text()
    point = embed.points[0]
    assert f"{point.requests_per_s:.2f} req/s, {point.input_tok_s:.1f} in tok/s" in line
    assert f"e2e p50 {point.latency_ms.p50:.1f} ms: valid" in line
    assert "tok/s/user" not in line

"""A worker process hosting several simulated workers: what it refuses, and its log tags."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import yaml

from mpi_workers.logging_setup import TagFilter, worker_log_tag, worker_tag


def write_config(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "engine": {"kind": kind},
        "workers": [{"count": 4}],
        "services": {"etcd": {"start": False, "endpoint": "http://127.0.0.1:1"},
                     "nats": {"start": False, "endpoint": "nats://127.0.0.1:1"}},
    }))  # fmt: skip
    return path


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpi_workers", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_instances_need_the_mocker_and_no_worker_id(tmp_path: Path) -> None:
    torch = run_worker("--config", str(write_config(tmp_path, "torch")), "--instances", "2")
    assert torch.returncode == 2
    assert "--instances: several workers in one process need engine.kind mocker" in torch.stderr
    assert "[worker agg g0 i0-1 rank0]" in torch.stderr  # the process's tag names its range
    mocker = str(write_config(tmp_path, "mocker"))
    named = run_worker("--config", mocker, "--instances", "2", "--worker-id", "agg-j1-i0")
    assert named.returncode == 2
    assert "--instances: at least 1, and 1 with --worker-id" in named.stderr


def test_each_hosted_worker_tags_the_lines_of_its_own_tasks() -> None:
    """The tag a worker's task sets is inherited by the tasks it creates (its subscriptions,
    requests), and not seen by its siblings' or the process's own lines."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.tag} {record.getMessage()}")  # type: ignore[attr-defined]

    handler = Collect()
    handler.addFilter(TagFilter(worker_tag("agg", 0, 0, 0, instances=2)))
    log = logging.getLogger("test.hosted")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def worker(index: int) -> None:
        worker_log_tag.set(worker_tag("agg", 0, index, 0))

        async def request() -> None:
            log.info("served by %d", index)

        await asyncio.create_task(request())

    async def process() -> None:
        await asyncio.gather(asyncio.create_task(worker(0)), asyncio.create_task(worker(1)))
        log.info("process line")

    try:
        asyncio.run(process())
    finally:
        log.removeHandler(handler)
    assert sorted(records) == [
        "[worker agg g0 i0 rank0] served by 0",
        "[worker agg g0 i0-1 rank0] process line",
        "[worker agg g0 i1 rank0] served by 1",
    ]

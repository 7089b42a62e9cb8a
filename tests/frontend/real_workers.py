"""Real workers behind a test frontend: `mpi_workers.worker.Worker` serving a real engine
(the simulated mocker, or the torch engine a test builds), and the official openai client
pointed at the frontend. For the integration tests that need more than a fake worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai

from contract.config import MockerConfig
from mpi_workers.engine.base import Engine
from mpi_workers.engine.mocker import MockerEngine, ModelShape
from mpi_workers.worker import Worker


@contextlib.asynccontextmanager
async def engine_worker(
    fe: Any, engine: Engine, worker_id: str = "agg-g0-i0", capacity: int = 16
) -> AsyncIterator[Any]:
    """A worker serving `engine` behind the harness `fe`, routable once this is entered,
    stopped on the way out. Yields the engine."""
    worker = Worker(engine, deployment=fe.config.name, worker_id=worker_id, role="agg",
                    nats_url=fe.nats_url, etcd_endpoint=fe.etcd_endpoint, lease_ttl_s=5,
                    capacity=capacity, drain_timeout_s=5)  # fmt: skip
    await worker.start()
    try:
        await fe.wait_for_workers(lambda ids: worker_id in ids)
        yield engine
    finally:
        await worker.stop()


def mocker_engine(model_dir: Path, num_blocks: int = 512) -> MockerEngine:
    """A simulated engine of `model_dir`'s shape, at 1000x real time."""
    return MockerEngine(MockerConfig(speedup=1000.0), model_name="smol",
                        shape=ModelShape.from_folder(model_dir), num_blocks=num_blocks)  # fmt: skip


def mocker_worker(
    fe: Any, model_dir: Path, worker_id: str = "agg-g0-i0"
) -> contextlib.AbstractAsyncContextManager[Any]:
    """`engine_worker` with a simulated engine."""
    return engine_worker(fe, mocker_engine(model_dir), worker_id)


def openai_client(fe: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="unused", max_retries=0)

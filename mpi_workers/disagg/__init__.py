"""Disaggregated serving on the worker side: prefill and decode roles (see contract.disagg)."""

from __future__ import annotations

from typing import Any

from contract.config import DeploymentConfig
from mpi_workers.engine.base import BlockKvHandoff, Engine, NativeKvHandoff


def worker_class(
    config: DeploymentConfig, role: str, engine: Engine
) -> tuple[type, dict[str, Any]]:
    """(Worker class, extra keyword arguments) for a worker of `role` serving `engine`:
    prefill/decode workers move KV with our kv_transfer or let the engine move its own."""
    if role not in ("prefill", "decode"):
        from mpi_workers.worker import Worker

        return Worker, {}
    extra = {"disaggregation": config.disaggregation}
    if isinstance(engine, NativeKvHandoff):
        from mpi_workers.disagg.native import NativeDisaggWorker

        return NativeDisaggWorker, extra
    if isinstance(engine, BlockKvHandoff):
        from mpi_workers.disagg.worker import DisaggWorker

        return DisaggWorker, extra
    raise TypeError(f"{type(engine).__name__} cannot serve the {role} role (no KV hand-off)")

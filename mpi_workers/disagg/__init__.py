"""Disaggregated serving on the worker side: prefill and decode roles (see contract.disagg)."""

from __future__ import annotations

from typing import Any

from contract.config import DeploymentConfig


def worker_class(config: DeploymentConfig, role: str) -> tuple[type, dict[str, Any]]:
    """(Worker class, extra keyword arguments) for a worker of `role`."""
    if role in ("prefill", "decode"):
        from mpi_workers.disagg.worker import DisaggWorker

        return DisaggWorker, {"disaggregation": config.disaggregation}
    from mpi_workers.worker import Worker

    return Worker, {}

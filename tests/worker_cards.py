"""Worker cards for unit tests: what a worker registers, with only the fields a test cares
about given (the rest are a plain aggregated worker's)."""

from __future__ import annotations

from typing import Any

from contract.discovery import WorkerCard


def worker_card(worker_id: str, **fields: Any) -> WorkerCard:
    card = {
        "worker_id": worker_id, "role": "agg", "model": "m", "block_size": 16,
        "subject": f"s.{worker_id}", "abort_subject": f"a.{worker_id}", "capacity": 4,
        "max_model_len": 4096,
    }  # fmt: skip
    return WorkerCard(**{**card, **fields})

"""What a sweep knows of each endpoint: one entry per `benchmark.endpoint` value, and which
deployment task serves it (the refusal's message)."""

from __future__ import annotations

import typing

import pytest

from contract.config import BenchmarkConfig
from hpcserve.bench.endpoints import ENDPOINTS, endpoint_kind, task_mismatch


def test_every_configurable_endpoint_is_known() -> None:
    values = typing.get_args(BenchmarkConfig.model_fields["endpoint"].annotation)
    assert set(values) == set(ENDPOINTS)
    assert [name for name, kind in ENDPOINTS.items() if not kind.produces_tokens] == [
        "embeddings"
    ]


@pytest.mark.parametrize(
    ("endpoint", "task", "served"),
    [("chat", "generate", True), ("responses", "generate", True),
     ("completions", "embed", False), ("embeddings", "embed", True),
     ("embeddings", "generate", False)],
)  # fmt: skip
def test_task_mismatch_names_the_endpoint_and_both_tasks(
    endpoint: str, task: str, served: bool
) -> None:
    message = task_mismatch(endpoint, task)
    if served:
        assert message is None
        return
    assert message is not None
    needed = endpoint_kind(endpoint).task
    assert f"--endpoint {endpoint} (benchmark.endpoint)" in message
    assert f"model.task: {needed}" in message and f"model.task: {task}" in message

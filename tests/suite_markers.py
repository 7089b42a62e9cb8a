"""The suite's markers beyond what test files write: `slow` is the union of the markers that
say what a test needs (SLOW_KINDS), so `-m 'not slow'` (make test-fast) leaves them all out;
`services` marks the tests that use the session's real etcd or nats-server."""

from __future__ import annotations

import pytest

SLOW_KINDS = ("integration", "e2e", "slurm", "model")
SERVICE_FIXTURES = frozenset({"etcd_endpoint", "nats_url"})


def add_derived_markers(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)

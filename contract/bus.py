"""NATS subjects and connection for the request plane and the event plane.

Request plane: the frontend publishes a `GenerateRequest` to a worker's `generate` subject
with a reply subject under its own inbox; the worker streams `GenerateOutput` chunks there.
Event plane: workers publish `KvEventBatch` and `LoadMetrics` on deployment-wide subjects.
Disaggregated serving's worker-to-worker subjects (contract.disagg's messages) are here too:
every subject name is built in this one module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient


def worker_subject(deployment: str, worker_id: str) -> str:
    """Where a worker listens for `GenerateRequest`s."""
    return f"hpcserve.{deployment}.worker.{worker_id}.generate"


def abort_subject(deployment: str, worker_id: str) -> str:
    """Where a worker listens for `AbortRequest`s."""
    return f"hpcserve.{deployment}.worker.{worker_id}.abort"


def kv_snapshot_subject(deployment: str, worker_id: str) -> str:
    """Request/reply: a worker answers with a `KvSnapshot` of its cached block hashes."""
    return f"hpcserve.{deployment}.worker.{worker_id}.kv_snapshot"


def prefill_subject(deployment: str, worker_id: str) -> str:
    """decode_first: a decode worker asks this prefill worker to prefill and push the KV."""
    return f"hpcserve.{deployment}.worker.{worker_id}.prefill"


def decode_subject(deployment: str, worker_id: str) -> str:
    """prefill_first: a prefill worker hands a request with a first token to this decoder."""
    return f"hpcserve.{deployment}.worker.{worker_id}.decode"


def kv_push_subject(deployment: str, worker_id: str) -> str:
    """prefill_first: a decode worker asks this prefill worker to push held KV to a ticket."""
    return f"hpcserve.{deployment}.worker.{worker_id}.kv_push"


def media_subject(deployment: str, frontend_id: str) -> str:
    """Where one frontend process answers chunk requests for the media it holds."""
    return f"hpcserve.{deployment}.media.{frontend_id}"


def responses_subject(deployment: str, frontend_id: str) -> str:
    """Where one frontend process takes requests about the background responses it runs
    (cancel, relay their events) from the other frontend processes."""
    return f"hpcserve.{deployment}.responses.{frontend_id}"


def kv_events_subject(deployment: str) -> str:
    return f"hpcserve.{deployment}.kv_events"


def load_metrics_subject(deployment: str) -> str:
    return f"hpcserve.{deployment}.load"


def frontend_load_subject(deployment: str) -> str:
    """Where each frontend process shares its in-flight requests per worker (load_share)."""
    return f"hpcserve.{deployment}.frontend_load"


async def connect(
    url: str, name: str, reconnected: Callable[[], Awaitable[None]] | None = None
) -> NatsClient:
    """Connect with reconnects that outlast a short NATS restart; `reconnected()` runs after
    each one (messages published meanwhile may be gone: NATS delivers at most once)."""
    options = {"reconnected_cb": reconnected} if reconnected is not None else {}
    return await nats.connect(
        servers=[url],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        **options,
    )

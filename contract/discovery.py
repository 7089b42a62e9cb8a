"""Who is alive: worker cards in etcd under a lease, and a live view of them for the frontend.

Key layout: `hpcserve/<deployment>/workers/<role>/<worker_id>` → JSON `WorkerCard`. A worker
keeps its lease alive; when it dies the lease lapses within the TTL and the key disappears,
so every watcher drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import aetcd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.messages import PROTOCOL_VERSION

logger = logging.getLogger(__name__)


class KvTransferInfo(BaseModel):
    """Where a disaggregated worker receives KV (decode) or is reached for it (prefill)."""

    model_config = ConfigDict(extra="forbid")

    backend: str  # ucx | nixl | tcp
    address: str
    tp: int = 1


class WorkerCard(BaseModel):
    """What a worker tells the world about itself."""

    model_config = ConfigDict(extra="forbid")

    version: int = PROTOCOL_VERSION
    worker_id: str
    role: str
    model: str
    block_size: int
    subject: str
    abort_subject: str
    capacity: int
    max_model_len: int
    simulated: bool = False
    kv_transfer: KvTransferInfo | None = None  # prefill and decode roles only
    engine: str = ""  # torch | mocker | trtllm
    # SamplingParams fields the engine cannot honour; "guided_thinking": it constrains a
    # reasoning model's thinking too (GuidedDecoding.thinking)
    unsupported_params: list[str] = []
    media: list[str] = []  # MediaRef kinds the engine takes ("image", "embeds"); [] text only
    # What the worker serves: "generate" (tokens), "embed" (`GenerateRequest.pooling`)
    tasks: list[str] = ["generate"]
    draining: bool = False  # leaving: no new requests, but its streams go on (not a loss)
    # One per worker process: a restarted worker keeps its worker_id but not its instance
    # (a request that lost the old one may go to the new one).
    instance: str = Field(default_factory=lambda: uuid.uuid4().hex)


def workers_prefix(deployment: str) -> str:
    return f"hpcserve/{deployment}/workers/"


def worker_key(deployment: str, role: str, worker_id: str) -> str:
    return f"{workers_prefix(deployment)}{role}/{worker_id}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'http://host:port' or 'host:port' → (host, port)."""
    address = endpoint.split("://", 1)[-1].rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} must look like http://host:port")
    return host, int(port)


def etcd_client(endpoint: str) -> aetcd.Client:
    host, port = parse_endpoint(endpoint)
    return aetcd.Client(host=host, port=port, timeout=5)


class LeasedKey:
    """One key kept in etcd under a lease of its own, kept alive until `close()`: it
    vanishes within the TTL of its process's death (a worker's card; a frontend process's
    mark that it still runs its background responses)."""

    def __init__(self, endpoint: str, key: str, value: bytes, ttl_s: int) -> None:
        self._client = etcd_client(endpoint)
        self._key = key.encode()
        self._value = value
        self._ttl_s = ttl_s
        self._lease: aetcd.Lease | None = None
        self._keepalive: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._put_with_new_lease()
        self._keepalive = asyncio.create_task(self._keep_alive(), name="etcd-keepalive")

    async def close(self) -> None:
        """Remove the key now instead of waiting for the lease to lapse."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()
        with contextlib.suppress(Exception):
            await self._client.close()

    async def _put_with_new_lease(self) -> None:
        self._lease = await self._client.lease(self._ttl_s)
        await self._client.put(self._key, self._value, lease=self._lease)

    async def _keep_alive(self) -> None:
        failed = False
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                if failed:  # etcd was away (restarted, maybe without its data): put the
                    # card again under a fresh lease rather than trust the old one
                    await self._put_with_new_lease()
                    logger.info("etcd reachable again; registration renewed")
                    failed = False
                    continue
                assert self._lease is not None
                await self._lease.refresh()
                remaining = await self._lease.remaining_ttl()
                if remaining <= 0:  # lapsed while we were away (a long pause)
                    logger.warning("etcd lease lapsed; registering again")
                    await self._put_with_new_lease()
            except Exception as exc:  # etcd briefly unreachable: keep trying
                logger.warning("etcd keep-alive failed: %s", exc)
                failed = True


class WorkerRegistration(LeasedKey):
    """A worker's card kept in etcd under a lease until `close()`."""

    def __init__(self, endpoint: str, deployment: str, card: WorkerCard, ttl_s: int) -> None:
        key = worker_key(deployment, card.role, card.worker_id)
        super().__init__(endpoint, key, card.model_dump_json().encode(), ttl_s)

    async def mark_draining(self) -> None:
        """Re-put the card with `draining: true` under the same lease: routers stop sending
        to this worker, and its streams are not taken for lost (a delete would be)."""
        card = WorkerCard.model_validate_json(self._value).model_copy(update={"draining": True})
        self._value = card.model_dump_json().encode()
        await self._client.put(self._key, self._value, lease=self._lease)


WorkersListener = Callable[[dict[str, WorkerCard]], None]


class WorkerDirectory:
    """A live map worker_id → card, fed by a prefix watch; listeners hear every change."""

    def __init__(self, endpoint: str, deployment: str) -> None:
        self._endpoint = endpoint
        self._prefix = workers_prefix(deployment).encode()
        self.workers: dict[str, WorkerCard] = {}
        self._by_key: dict[bytes, str] = {}
        self._listeners: list[WorkersListener] = []
        self._task: asyncio.Task[None] | None = None
        self._first_sync = asyncio.Event()

    def add_listener(self, listener: WorkersListener) -> None:
        self._listeners.append(listener)

    async def start(self, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="etcd-watch")
        await asyncio.wait_for(self._first_sync.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            client = etcd_client(self._endpoint)
            try:
                await self._sync_and_watch(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("etcd watch failed (%s); resyncing", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await client.close()

    async def _sync_and_watch(self, client: aetcd.Client) -> None:
        snapshot = await client.get_prefix(self._prefix)
        self._by_key.clear()
        self.workers = {}
        for kv in snapshot:
            self._apply_put(kv.key, kv.value)
        self._notify()
        self._first_sync.set()
        watch = await client.watch_prefix(self._prefix, start_revision=snapshot.header.revision + 1)
        async for event in watch:
            if event.kind == aetcd.EventKind.PUT:
                self._apply_put(event.kv.key, event.kv.value)
            else:
                worker_id = self._by_key.pop(event.kv.key, None)
                if worker_id is not None:
                    self.workers.pop(worker_id, None)
                    logger.info("worker %s left", worker_id)
            self._notify()

    def _apply_put(self, key: bytes, value: bytes) -> None:
        try:
            card = WorkerCard.model_validate_json(value)
        except ValidationError as exc:
            logger.error("ignoring malformed worker card at %s: %s", key.decode(), exc)
            return
        if card.version != PROTOCOL_VERSION:
            logger.error(
                "ignoring worker %s: protocol version %s, expected %s",
                card.worker_id,
                card.version,
                PROTOCOL_VERSION,
            )
            return
        if card.worker_id not in self.workers:
            logger.info("worker %s joined (%s)", card.worker_id, card.role)
        self._by_key[key] = card.worker_id
        self.workers[card.worker_id] = card

    def _notify(self) -> None:
        current = dict(self.workers)
        for listener in self._listeners:
            listener(current)

"""Stored responses of /v1/responses (`store: true`): kept in etcd, not in the process, as
the frontend processes of a deployment (frontend.workers) share the port and a follow-up
(`previous_response_id`, GET, DELETE) may land on any of them.

A record is the response object and the conversation that led to it (its input items,
after those of the response it continued), under `hpcserve/<deployment>/responses/<id>`
with a lease: etcd drops it when the lease lapses. The records a process writes within a
tenth of the TTL (at most a minute) share one lease of TTL + that share, so most writes are
one etcd request, not two (a lease grant each): a record lives between
frontend.responses_store_ttl_s and that plus the share. Records that wait while a write is
in flight go together in the next one (one etcd transaction): a put costs ~330 µs of
frontend CPU through aetcd, a put of a transaction of 4 ~95 µs (benchmarks/README.md).
A record larger than frontend.responses_store_max_bytes (below etcd's 1.5 MiB request
limit) is not kept, nor one etcd fails to take: the answer then says `store: false`, and
a later `previous_response_id` naming it is a 404 like any unknown id.

A background response's record is written while it runs too (status queued, then
in_progress), each time with the `owner` that runs it (who keeps its events): a frontend
process's id, whose mark (`owner_key`, a key under that process's own short lease:
`contract.discovery.LeasedKey`) vanishes within frontend.background_owner_ttl_s of the
process's death; `owner_alive` tells whether a run can still end (`frontend.background`).

The etcd client is opened on the first use: a deployment whose clients send
`store: false` never talks to etcd for responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from typing import Any

import aetcd
import orjson

from contract.discovery import etcd_client
from frontend.errors import OpenAIError

logger = logging.getLogger(__name__)

MAX_BATCH = 64  # records per etcd transaction (etcd's default limit: 128 operations)
MAX_BATCH_BYTES = 1_400_000  # and their bytes (etcd's request limit: 1.5 MiB)
_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
_ITEM_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}


def responses_prefix(deployment: str) -> str:
    return f"hpcserve/{deployment}/responses/"


def owner_key(deployment: str, owner: str) -> str:
    """The mark of a frontend process that runs background responses (`owner` its id)."""
    return f"hpcserve/{deployment}/responses-owners/{owner}"


def not_found(response_id: str, param: str | None = None) -> OpenAIError:
    """OpenAI's answer for an unknown (or expired, or deleted) response id: a 404 for the
    stored response's own routes, a 400 previous_response_not_found for a request that
    continues it (as OpenAI answers; agents' clients recognise that code)."""
    if param == "previous_response_id":
        return OpenAIError(
            400, f"Previous response with id '{response_id}' not found.", param=param,
            code="previous_response_not_found",
        )  # fmt: skip
    return OpenAIError(
        404, f"Response with id '{response_id}' not found.", code="response_not_found"
    )


def unavailable(exc: Exception) -> OpenAIError:
    return OpenAIError(
        503, f"the response store (etcd) did not answer: {exc}", type="service_unavailable",
        code="store_unavailable",
    )  # fmt: skip


def with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as stored: each with an `id` (OpenAI lists them with theirs)."""
    return [item if "id" in item else {"id": _new_item_id(item), **item} for item in items]


def _new_item_id(item: dict[str, Any]) -> str:
    return _ITEM_PREFIXES.get(item.get("type", ""), "item_") + secrets.token_hex(16)


class ResponseStore:
    """The deployment's stored responses in etcd (one client per frontend process)."""

    def __init__(self, endpoint: str, deployment: str, ttl_s: int, max_bytes: int) -> None:
        self._endpoint = endpoint
        self._prefix = responses_prefix(deployment)
        self._deployment = deployment
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._client: aetcd.Client | None = None
        self._share_s = max(1.0, min(60.0, ttl_s / 10))
        self._lease: aetcd.Lease | None = None
        self._lease_until = 0.0  # monotonic time after which a new lease is granted
        # records waiting for the next write: (key, value, its outcome)
        self._waiting: list[tuple[bytes, bytes, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    def _etcd(self) -> aetcd.Client:
        if self._client is None:
            self._client = etcd_client(self._endpoint)
        return self._client

    def _key(self, response_id: str) -> bytes:
        return (self._prefix + response_id).encode()

    async def put(
        self, response: dict[str, Any], items: list[dict[str, Any]], owner: str | None = None
    ) -> bool:
        """Keep `response` (its `store` set true) with the conversation `items` (and the
        `owner` running it, while it runs in the background); False when it was not kept
        (too large, or etcd failed: logged)."""
        # a client leaving does not undo the write
        return await asyncio.shield(self.put_soon(response, items, owner))

    def put_soon(
        self, response: dict[str, Any], items: list[dict[str, Any]], owner: str | None = None
    ) -> asyncio.Future[bool]:
        """`put`, queued now (the records of one key land in the order they were queued):
        its outcome to await later."""
        response["store"] = True
        record: dict[str, Any] = {"response": response, "input": items}
        if owner is not None:
            record["owner"] = owner
        value = orjson.dumps(record)
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if len(value) > self.max_bytes:
            logger.warning(
                "response %s not stored: %d bytes, more than frontend.responses_store_max_bytes "
                "(%d)", response["id"], len(value), self.max_bytes,
            )  # fmt: skip
            outcome.set_result(False)
            return outcome
        self._waiting.append((self._key(response["id"]), value, outcome))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="response-store-writer")
        return outcome

    async def _write(self) -> None:
        """Write the waiting records, as many per etcd request as its size limit allows,
        until none waits. A record written again while its first write waits (a background
        response's progress, then its end) goes in the next request: etcd refuses a key
        twice in one transaction, and the later value must land last."""
        while self._waiting:
            batch, size, keys = [], 0, set()
            while self._waiting and len(batch) < MAX_BATCH:
                size += len(self._waiting[0][1])
                if batch and (size > MAX_BATCH_BYTES or self._waiting[0][0] in keys):
                    break
                keys.add(self._waiting[0][0])
                batch.append(self._waiting.pop(0))
            kept = await self._put_batch([(key, value) for key, value, _ in batch])
            for _, _, outcome in batch:
                if not outcome.done():
                    outcome.set_result(kept)

    async def _put_batch(self, records: list[tuple[bytes, bytes]]) -> bool:
        try:
            client = self._etcd()
            lease = await self._shared_lease(client)
            if len(records) == 1:
                await client.put(records[0][0], records[0][1], lease=lease)
            else:
                puts = [client.transactions.put(key, value, lease=lease) for key, value in records]
                await client.transaction(compare=[], success=puts, failure=[])
        except Exception as exc:  # etcd away: the answers say store false
            logger.warning("%d responses not stored: etcd: %s", len(records), exc)
            self._lease = None  # etcd may have lost it (restarted without its data)
            return False
        return True

    async def _shared_lease(self, client: aetcd.Client) -> aetcd.Lease:
        """The lease of this share of time (a new one once it is over)."""
        now = time.monotonic()
        if self._lease is None or now >= self._lease_until:
            self._lease = await client.lease(int(self.ttl_s + self._share_s) + 1)
            self._lease_until = now + self._share_s
        return self._lease

    async def get(self, response_id: str, param: str | None = None) -> dict[str, Any]:
        """The record of `response_id` ({"response", "input"}), or a 404 naming `param`."""
        if not _RESPONSE_ID.fullmatch(response_id):
            raise not_found(response_id, param)
        try:
            found = await self._etcd().get(self._key(response_id))
        except Exception as exc:
            raise unavailable(exc) from None
        if found is None:
            raise not_found(response_id, param)
        record: dict[str, Any] = orjson.loads(found.value)
        return record

    async def owner_alive(self, owner: str) -> bool:
        """Whether the frontend process `owner` still runs (its mark is in etcd)."""
        try:
            found = await self._etcd().get(owner_key(self._deployment, owner).encode())
        except Exception as exc:
            raise unavailable(exc) from None
        return found is not None

    async def delete(self, response_id: str) -> None:
        """Forget `response_id`, or a 404 if it is not stored."""
        if not _RESPONSE_ID.fullmatch(response_id):
            raise not_found(response_id)
        try:
            deleted = await self._etcd().delete(self._key(response_id))
        except Exception as exc:
            raise unavailable(exc) from None
        if deleted is None or not deleted.deleted:
            raise not_found(response_id)

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._writer, 5.0)
        if self._client is not None:
            try:
                await self._client.close()
            except Exception as exc:  # closing anyway
                logger.debug("closing the response store's etcd client: %s", exc)
            self._client = None

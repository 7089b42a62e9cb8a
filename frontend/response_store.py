"""Stored responses of /v1/responses (`store: true`): kept in etcd, not in the process, as
the frontend processes of a deployment (frontend.workers) share the port and a follow-up
(`previous_response_id`, GET, DELETE) may land on any of them.

A record is the response object and the conversation that led to it (its input items,
after those of the response it continued), under `hpcserve/<deployment>/responses/<id>`
with a lease of frontend.responses_store_ttl_s: etcd drops it when the lease lapses.
A record larger than frontend.responses_store_max_bytes (below etcd's 1.5 MiB request
limit) is not kept, nor one etcd fails to take: the answer then says `store: false`, and
a later `previous_response_id` naming it is a 404 like any unknown id.

The etcd client is opened on the first use: a deployment whose clients send
`store: false` never talks to etcd for responses.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

import aetcd
import orjson

from contract.discovery import etcd_client
from frontend.errors import OpenAIError

logger = logging.getLogger(__name__)

_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
_ITEM_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}


def responses_prefix(deployment: str) -> str:
    return f"hpcserve/{deployment}/responses/"


def not_found(response_id: str, param: str | None = None) -> OpenAIError:
    """OpenAI's answer for an unknown (or expired, or deleted) response id."""
    what = "Previous response" if param == "previous_response_id" else "Response"
    return OpenAIError(
        404,
        f"{what} with id '{response_id}' not found.",
        param=param,
        code="previous_response_not_found" if param else "response_not_found",
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
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._client: aetcd.Client | None = None

    def _etcd(self) -> aetcd.Client:
        if self._client is None:
            self._client = etcd_client(self._endpoint)
        return self._client

    def _key(self, response_id: str) -> bytes:
        return (self._prefix + response_id).encode()

    async def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> bool:
        """Keep `response` (its `store` set true) with the conversation `items`; False
        when it was not kept (too large, or etcd failed: logged)."""
        response["store"] = True
        value = orjson.dumps({"response": response, "input": items})
        if len(value) > self.max_bytes:
            logger.warning(
                "response %s not stored: %d bytes, more than frontend.responses_store_max_bytes "
                "(%d)", response["id"], len(value), self.max_bytes,
            )  # fmt: skip
            return False
        try:
            client = self._etcd()
            lease = await client.lease(self.ttl_s)
            await client.put(self._key(response["id"]), value, lease=lease)
        except Exception as exc:  # etcd away: the answer says store false
            logger.warning("response %s not stored: etcd: %s", response["id"], exc)
            return False
        return True

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
        if self._client is not None:
            try:
                await self._client.close()
            except Exception as exc:  # closing anyway
                logger.debug("closing the response store's etcd client: %s", exc)
            self._client = None


"""Request migration: a request whose worker is lost mid-stream continues on another worker.

A worker that crashes (SIGKILL, OOM, a lost node) used to cost the client its request. The
frontend holds everything needed to go on: the prompt's token ids and every token already
streamed. A *continuation* request is the prompt plus those tokens with `max_tokens` reduced
by their number, sent to another worker of the same role (the normal routing, minus the
workers that failed this request). The client's response goes on as one: the detokenizer and
stop matcher live in the frontend and are simply fed on; usage counts the original prompt and
every generated token. Greedy decoding yields exactly the tokens of an uninterrupted run;
seeded sampling cannot be continued bit-exactly (the sampler's RNG state died with the
worker), and presence/frequency penalties see the earlier tokens as prompt, not output.

Only `WorkerLost` migrates. A worker's own error reply (finish_reason "error") is an answer,
not a loss; so is a TP group's failure, which withholds its errors and deregisters so that
its requests come here. A draining worker (SIGTERM, `hpcserve drain`) marks its card
`draining` and keeps its streams; only what it still holds at its drain timeout is handed
back (the card goes, unanswered): those migrate, and the worker gets the usual abort.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from contract.discovery import WorkerCard
from contract.messages import GenerateOutput, GenerateRequest
from frontend import errors
from frontend.errors import OpenAIError
from frontend.metrics import FrontendMetrics
from frontend.worker_client import (
    ConnectionLost,
    NotListening,
    RequestStream,
    WorkerClient,
    WorkerLost,
)

logger = logging.getLogger(__name__)

UNHEARD_RETRIES = 6  # backoffs 0.05 .. 1.6 s: about 3 s for a worker to answer again

Route = Callable[[GenerateRequest, set[str]], Awaitable[WorkerCard]]
"""Picks the worker for a request, excluding the given worker ids (the app's routing)."""


def continuation(request: GenerateRequest, produced: Sequence[int]) -> GenerateRequest:
    """`request` resumed after it `produced` these tokens: they join the prompt and
    `max_tokens` (and `min_tokens`, down to 0) shrink by their number; sampling is
    otherwise unchanged. The id is fresh:
    replies are matched to requests by id, and late chunks of the lost attempt must not
    leak into the new one. The prompt's logprobs came with the first produced token's chunk:
    a continuation after that asks for none (its prompt would be the longer one anyway).
    An output constraint counts the produced tokens as output it already holds."""
    update: dict[str, Any] = {
        "max_tokens": request.sampling.max_tokens - len(produced),
        "min_tokens": max(0, request.sampling.min_tokens - len(produced)),
    }
    if produced:
        update["prompt_logprobs"] = None
    guided = request.sampling.guided
    if guided is not None:  # the new attempt's matcher consumes the produced tokens first
        update["guided"] = guided.model_copy(update={"generated": guided.generated + len(produced)})
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        client_id=request.client_id,
        token_ids=[*request.token_ids, *produced],
        choice_index=request.choice_index,
        sampling=request.sampling.model_copy(update=update),
        media=request.media,  # the images sit in the prompt part, where they were
        pooling=request.pooling,  # an embedding is retried whole (it produces no tokens)
    )


class MigratingStream:
    """One client request's token stream across worker attempts.

    `next()` hides lost workers: it re-sends the request (before any token: the same prompt,
    a plain retry as always; after tokens: a continuation, at most `limit` times) and returns
    the next chunk of whichever attempt is current. Chunks of a continuation report the
    original prompt length and the first attempt's cached tokens, so usage stays the
    request's. 503 when no worker is left or the limit is spent: never a hang.
    """

    def __init__(
        self,
        client: WorkerClient,
        route: Route,
        request: GenerateRequest,
        *,
        limit: int,
        metrics: FrontendMetrics,
    ) -> None:
        self._client = client
        self._route = route
        self._request = request  # the current attempt's request, as sent
        self._stream: RequestStream | None = None
        self._produced: list[int] = []  # tokens of the current attempt
        self._limit = limit
        self._metrics = metrics
        self._prompt_tokens = len(request.token_ids)
        self._cached_tokens = 0  # as the first attempt reported them
        self._unheard = 0  # attempts nobody was listening for (NotListening), in a row
        self.exclude: set[str] = set()  # worker instances that failed this request
        self.generated = 0  # tokens produced across all attempts
        self.migrations = 0

    @property
    def card(self) -> WorkerCard:
        assert self._stream is not None, "next() first"
        return self._stream.card

    @property
    def opened(self) -> bool:
        """Whether an attempt was sent (its `card` is known)."""
        return self._stream is not None

    @property
    def has_pending(self) -> bool:
        """Whether a chunk is already queued (the caller may batch it into one event)."""
        return self._stream is not None and not self._stream.queue.empty()

    async def open(self) -> WorkerCard:
        """Route and send the first attempt now (else the first `next()` does); its worker."""
        if self._stream is None:
            await self._open(self._request)
        return self.card

    async def next(self, deadline: float) -> GenerateOutput:
        """The next chunk of the request; TimeoutError past `deadline` (loop time)."""
        if self._stream is None:
            await self._open(self._request)
        while True:
            assert self._stream is not None
            try:
                output = await self._stream.next(deadline)
            except WorkerLost as lost:
                done = await self._recover(lost)
                if done is not None:
                    return done
                continue
            self._produced.extend(output.token_ids)
            self.generated += len(output.token_ids)
            if self.migrations == 0:
                self._cached_tokens = output.num_cached_tokens or self._cached_tokens
                return output
            return output.model_copy(
                update={
                    "num_prompt_tokens": self._prompt_tokens,
                    "num_cached_tokens": self._cached_tokens,
                }
            )

    def close(self) -> None:
        """Idempotent; aborts the current attempt on its worker unless it finished."""
        if self._stream is not None:
            self._stream.close()

    async def _open(self, request: GenerateRequest) -> None:
        card = await self._route(request, self.exclude)
        try:
            self._stream = await self._client.open(card, request)
        except Exception as exc:
            raise errors.no_worker(f"cannot reach worker {card.worker_id}: {exc}") from None
        self._request = request
        self._produced = []

    async def _recover(self, lost: WorkerLost) -> GenerateOutput | None:
        """Re-send after `lost`; a final chunk when the lost attempt had used its budget."""
        assert self._stream is not None
        self._stream.close()  # releases the router's accounting, aborts it on a draining worker
        if isinstance(lost, NotListening) and self._unheard < UNHEARD_RETRIES:
            # The attempt never arrived: route it again after a short backoff, excluding no
            # one yet (after a NATS restart the workers re-subscribe within a moment; a dead
            # worker's card is dropped by its supervisor meanwhile). Not a migration.
            delay = 0.05 * 2**self._unheard
            self._unheard += 1
            logger.info("%s; routing the attempt again in %.2f s", lost, delay)
            await asyncio.sleep(delay)
            await self._open(continuation(self._request, []))
            return None
        self._unheard = 0
        if not isinstance(lost, ConnectionLost):  # a reconnect is no fault of the worker
            self.exclude.add(self._stream.card.instance)  # not its id: a restart may serve it
        if self.generated == 0:
            logger.warning("%s before its first token; retrying on another worker", lost)
            await self._open(continuation(self._request, []))
            return None
        request = continuation(self._request, self._produced)
        if request.sampling.max_tokens <= 0:  # every token arrived, only the finish did not
            logger.info("%s after its last token; finishing the request here", lost)
            return GenerateOutput(
                request_id=request.request_id,
                finish_reason="length",
                num_prompt_tokens=self._prompt_tokens,
                num_cached_tokens=self._cached_tokens,
            )
        if self.migrations >= self._limit:
            self._metrics.migrations.labels("exhausted").inc()
            logger.warning("%s; migration limit %d reached, failing the request", lost, self._limit)
            raise errors.no_worker(
                f"{lost} after {self.generated} generated tokens; the request already moved "
                f"{self.migrations} time(s), frontend.migration_limit is {self._limit}"
            )
        self.migrations += 1
        try:
            await self._open(request)
        except OpenAIError as exc:
            if exc.status == 503:
                self._metrics.migrations.labels("exhausted").inc()
                logger.warning("%s; no worker can continue the request: %s", lost, exc.message)
                raise errors.no_worker(
                    f"{lost} after {self.generated} generated tokens; the request could not "
                    f"move to another worker: {exc.message}"
                ) from None
            raise
        self._metrics.migrations.labels("migrated").inc()
        logger.warning(
            "request %s: %s after %d generated tokens; continuing on %s as %s (migration %d of "
            "at most %d)", request.client_id, lost, self.generated, self.card.worker_id,
            request.request_id, self.migrations, self._limit,
        )  # fmt: skip
        return None

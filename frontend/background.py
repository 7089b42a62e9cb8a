"""Background responses of /v1/responses (`background: true`): the POST answers at once
(`queued`) and the generation runs as a task of the frontend process that took it, held by
no HTTP connection (a client that leaves stops nothing); the client polls GET, may cancel,
and a streamed one's events are kept so a client can re-attach (`?stream=true&
starting_after=N`).

Every frontend process of a deployment sees the record in the store (etcd,
`frontend.response_store`): queued when the POST answers, in_progress once the worker
started, then the whole response as a foreground one is stored (or failed, or cancelled).
The record names its `owner` (the process's id); what only the owner can do, the other
processes ask it over NATS, on the owner's own subject (`contract.bus.responses_subject`):
cancel a run (the owner stops the task: the worker's request is aborted as a client's
disconnect aborts it) and relay a run's events. NATS rather than an etcd watch because
both are questions to one process that wait for its answer (the cancelled response; the
events as they come), which request-reply carries directly, and a dead owner is known at
once ("no responders") where a watch would wait for nobody; the events themselves would
cost an etcd write each (~0.3 ms of CPU per token) and grow etcd's history.

A crash: the owner keeps a mark in etcd under a lease of its own
(frontend.background_owner_ttl_s, `contract.discovery.LeasedKey`) while it runs background
responses; a GET of a record still queued or in_progress whose owner's mark is gone reports
it `failed` (the process ended before it finished) and writes that back. The request is not
run again: a client sends it again (another process taking it up could run it twice where
the owner lives but lost etcd, and a re-attached stream's sequence numbers would not go on
from the lost ones). A process that stops in order (SIGTERM, a restart) ends its runs as
failed, written, before it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from starlette.responses import Response

from contract.bus import responses_subject
from contract.discovery import LeasedKey
from frontend import errors
from frontend.errors import OpenAIError
from frontend.metrics import FrontendMetrics
from frontend.prepared import Prepared
from frontend.response_objects import ResponsesAnswer, sse_event
from frontend.response_store import ResponseStore, owner_key, unavailable
from frontend.responses import SSEResponse, json_response

if TYPE_CHECKING:
    from frontend.serving import Detach

logger = logging.getLogger(__name__)

RUNNING = frozenset({"queued", "in_progress"})
FINISHED_KEPT_S = 600.0  # how long a finished run's events stay for re-attaching streams
ASK_TIMEOUT_S = 10.0  # an owner's answer to a cancel or a relay (it waits for the run's end)
OWNER_GONE = (
    "the frontend process that ran this background response ended before it finished "
    "(it crashed or was killed); send the request again"
)
STOPPED = (
    "the frontend process that ran this background response was stopped before it "
    "finished; send the request again"
)


class BackgroundRun:
    """One background response this process runs: its task, its latest response object
    (queued, then the final one), and its events so far when it was asked streamed."""

    def __init__(self, response: dict[str, Any], streamed: bool) -> None:
        self.response = response
        self.events: list[bytes] | None = [] if streamed else None
        self.task: asyncio.Task[None] | None = None
        self.started = False  # its task began (a cancel before that stops it at its start)
        self.stop_reason: str | None = None  # "cancelled", or "stopped" (shutdown)
        self.finished_at: float | None = None  # monotonic
        self._more = asyncio.Event()  # set (and replaced) on each event and at the end

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def add(self, event: bytes) -> None:
        if self.events is not None:
            self.events.append(event)
            self._wake()

    def finish(self, response: dict[str, Any]) -> None:
        self.response = response
        self.finished_at = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    def stop(self, reason: str) -> None:
        """Stop the run (its handler writes the response `reason` leaves)."""
        if self.stop_reason is not None or self.done:
            return
        self.stop_reason = reason
        if self.started and self.task is not None:
            self.task.cancel()

    async def follow(self, after: int) -> AsyncIterator[bytes]:
        """Its events after sequence number `after` (each event's number is its place in
        the list), live until it ends."""
        assert self.events is not None
        index = after + 1
        while True:
            more = self._more
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.done:
                return
            await more.wait()


class BackgroundResponses:
    """The background responses of one frontend process (`owner`), and the way to those of
    the others (the store, and their NATS subjects)."""

    def __init__(
        self, store: ResponseStore, etcd_endpoint: str, deployment: str, owner: str,
        owner_ttl_s: int, limit: int, metrics: FrontendMetrics,
    ) -> None:  # fmt: skip
        self._store = store
        self._metrics = metrics
        self._deployment = deployment
        self.owner = owner
        self._limit = limit
        self._runs: dict[str, BackgroundRun] = {}
        self._mark = LeasedKey(etcd_endpoint, owner_key(deployment, owner), b"1", owner_ttl_s)
        self._marked: asyncio.Task[None] | None = None  # the mark's first put
        self._owner_ttl_s = owner_ttl_s
        self._nats: NatsClient | None = None
        self._subscription: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, nc: NatsClient) -> None:
        self._nats = nc
        subject = responses_subject(self._deployment, self.owner)
        self._subscription = await nc.subscribe(subject, cb=self._on_ask)

    async def stop(self) -> None:
        """End the runs as failed (written to the store), then leave."""
        running = [run for run in self._runs.values() if not run.done]
        for run in running:
            run.stop("stopped")
        tasks = [run.task for run in running if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        for task in list(self._tasks):
            task.cancel()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if self._marked is not None:
            await self._mark.close()

    # ---- this process's runs -----------------------------------------------------------

    def detach(
        self, answer: ResponsesAnswer, streamed: bool, conversation: list[dict[str, Any]]
    ) -> Detach:
        """What `serving.serve` hands the request's stream to: it is launched here, and
        the POST answered with the queued response (streamed: its events, live)."""

        async def launch(
            prepared: Prepared, events: AsyncIterator[bytes], release: list[Callable[[], None]]
        ) -> Response:
            run = await self._launch(prepared, answer, events, release, conversation, streamed)
            response = SSEResponse(run.follow(-1), []) if streamed else json_response(run.response)
            response.headers["X-Request-Id"] = prepared.response_id
            return response

        return launch

    async def _launch(
        self, prepared: Prepared, answer: ResponsesAnswer, events: AsyncIterator[bytes],
        release: list[Callable[[], None]], conversation: list[dict[str, Any]], streamed: bool,
    ) -> BackgroundRun:  # fmt: skip
        self._forget_old()
        running = sum(1 for run in self._runs.values() if not run.done)
        if running >= self._limit:
            raise OpenAIError(
                429, f"background: this frontend process runs {running} background responses, "
                f"its most (frontend.max_background_responses); retry later",
                type="rate_limit_exceeded", param="background", code="rate_limit_exceeded",
            )  # fmt: skip
        await self._marked_alive()
        queued = answer.skeleton(prepared.response_id, prepared.created)
        queued["status"] = "queued"
        if not await self._store.put(queued, conversation, self.owner):
            raise unavailable(RuntimeError("the background response could not be recorded"))
        run = BackgroundRun(queued, streamed)
        self._runs[prepared.response_id] = run
        self._metrics.background_running.inc()
        run.task = asyncio.create_task(
            self._run(run, answer, events, release, conversation),
            name=f"background-{prepared.response_id}",
        )
        return run

    async def _marked_alive(self) -> None:
        """This process's mark in etcd, put once (the first background response waits)."""
        if self._marked is None:
            self._marked = asyncio.create_task(self._mark.open())
        try:
            await asyncio.shield(self._marked)
        except Exception as exc:
            self._marked = None
            raise unavailable(exc) from None

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - FINISHED_KEPT_S
        old = [key for key, run in self._runs.items() if (run.finished_at or cutoff) < cutoff]
        for response_id in old:
            del self._runs[response_id]

    async def _run(
        self, run: BackgroundRun, answer: ResponsesAnswer, events: AsyncIterator[bytes],
        release: list[Callable[[], None]], conversation: list[dict[str, Any]],
    ) -> None:  # fmt: skip
        """Drive the stream to its end, keeping its events; write the record as it starts
        and as it ends however it ends."""
        run.started = True
        progress: asyncio.Future[bool] | None = None  # the in_progress write, queued
        final: dict[str, Any] | None = None
        kept = False  # the final response was written on the way (`finished`)
        try:
            if run.stop_reason is None:
                async for event in events:
                    run.add(event)
                    if progress is None and answer.stream is not None:  # the worker began
                        started = dict(answer.stream.response, status="in_progress")
                        # queued now: before the end's write, which may come in this turn
                        progress = self._store.put_soon(started, conversation, self.owner)
                if answer.stream is not None:  # response.failed was not kept on the way
                    final = answer.stream.response
                    kept = final["status"] != "failed"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except OpenAIError as exc:  # before the first event: no worker, a timeout, ...
            error = {"code": exc.code or "server_error", "message": exc.message}
            final = dict(run.response, status="failed", error=error)
            run.add(sse_event("response.failed", {"response": final}, 0))
        except Exception as exc:
            logger.exception("background response %s failed", run.response["id"])
            error = {"code": "server_error", "message": f"the frontend failed: {exc}"}
            final = dict(run.response, status="failed", error=error)
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # never started (stopped at once): nothing else closes it
            for callback in release:
                callback()
        if final is None:  # stopped
            final = self._stopped(run, answer)
        if progress is not None:
            await asyncio.wait([progress])
        if not kept:
            await self._store.put(final, conversation, self.owner)
        self._finish(run, final)

    def _finish(self, run: BackgroundRun, final: dict[str, Any]) -> None:
        run.finish(final)
        self._metrics.background_running.dec()
        self._metrics.background_ended.labels(final["status"]).inc()

    def _stopped(self, run: BackgroundRun, answer: ResponsesAnswer) -> dict[str, Any]:
        """The response a stopped run leaves: cancelled (a client asked), or failed (the
        process stops), with the output so far."""
        stream = answer.stream
        if run.stop_reason == "cancelled":
            return stream.ended("cancelled") if stream else dict(run.response, status="cancelled")
        error = {"code": "server_error", "message": STOPPED}
        final = stream.ended("failed", error) if stream else dict(run.response, status="failed",
                                                                   error=error)  # fmt: skip
        run.add(sse_event("response.failed", {"response": final}, stream.sequence if stream else 0))
        return final

    async def _cancel_here(self, response_id: str) -> dict[str, Any] | None:
        """Stop this process's run of `response_id`; its response once it ended (None:
        not run here)."""
        run = self._runs.get(response_id)
        if run is None:
            return None
        run.stop("cancelled")
        if run.task is not None:
            await asyncio.wait([run.task])
        return run.response

    # ---- any process's runs, through the store (and their owner) -------------------------

    async def current(self, record: dict[str, Any]) -> dict[str, Any]:
        """The response as GET shows it: the record's, failed when its owner is gone."""
        response: dict[str, Any] = record["response"]
        if response["status"] not in RUNNING:
            return response
        run = self._runs.get(response["id"])
        if run is not None and run.done:  # its end was not written (etcd away)
            return run.response
        owner = record.get("owner")
        if owner is None or owner == self.owner or await self._store.owner_alive(owner):
            return response
        error = {"code": "server_error", "message": OWNER_GONE}
        failed = dict(response, status="failed", error=error)
        await self._store.put(failed, record["input"], owner)  # the next reader: no check
        return failed

    async def cancel(self, record: dict[str, Any]) -> dict[str, Any]:
        """Cancel a stored background response (still running, by `current`): its owner
        stops it; the response as it was left."""
        response: dict[str, Any] = await self.current(record)
        if response["status"] not in RUNNING:
            return response
        owner = record.get("owner")
        if owner == self.owner:
            done = await self._cancel_here(response["id"])
        else:
            try:
                answer = await self._ask(owner or "", {"op": "cancel", "id": response["id"]})
            except nats.errors.NoRespondersError:  # gone since `current` looked
                answer = {"response": None}
            done = answer["response"]
        if done is None:  # it ended meanwhile, or its owner went: as the store has it
            record = await self._store.get(response["id"])
            done = await self.current(record)
            if done["status"] in RUNNING:
                done = dict(done, status="cancelled")
                await self._store.put(done, record["input"], record.get("owner"))
        return done

    async def events(
        self, record: dict[str, Any], after: int
    ) -> tuple[AsyncIterator[bytes], list[Callable[[], None]]]:
        """A streamed background response's events after sequence number `after`: here,
        or relayed from the process that runs it; with what to call once they were sent."""
        response = record["response"]
        run = self._runs.get(response["id"])
        if run is not None:
            if run.events is None:
                raise _not_streamed(response["id"])
            return run.follow(after), []
        owner = record.get("owner")
        if owner is None or owner == self.owner:  # finished long ago, or foreground
            raise _not_kept(response)
        return await self._relayed(owner, response, after)

    async def _relayed(
        self, owner: str, response: dict[str, Any], after: int
    ) -> tuple[AsyncIterator[bytes], list[Callable[[], None]]]:
        """The owner's events of `response`, sent to an inbox of this process."""
        assert self._nats is not None
        nc = self._nats
        inbox = nc.new_inbox()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def take(msg: Msg) -> None:
            queue.put_nowait(msg.data)

        subscription = await nc.subscribe(inbox, cb=take)
        closed = [lambda: self._spawn(subscription.unsubscribe())]
        try:
            ask = {"op": "events", "id": response["id"], "after": after, "inbox": inbox}
            answer = await self._ask(owner, ask)
            if answer.get("error") == "not_streamed":
                raise _not_streamed(response["id"])
            if answer.get("error"):
                raise _not_kept(response)
        except nats.errors.NoRespondersError:
            closed[0]()
            raise errors.bad_request(
                f"stream: the frontend process that ran response {response['id']} ended, and "
                "its events with it; GET it without stream", param="stream",
            ) from None  # fmt: skip
        except BaseException:  # the inbox is not read: unsubscribed
            closed[0]()
            raise

        async def relay() -> AsyncIterator[bytes]:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), self._owner_ttl_s)
                except TimeoutError:  # a long wait: is the owner still there?
                    if await self._store.owner_alive(owner):
                        continue
                    return
                if not event:
                    return
                yield event

        return relay(), closed

    async def _ask(self, owner: str, question: dict[str, Any]) -> dict[str, Any]:
        """The owner's answer (NoRespondersError: no process listens there any more)."""
        assert self._nats is not None
        subject = responses_subject(self._deployment, owner)
        try:
            msg = await self._nats.request(subject, orjson.dumps(question), ASK_TIMEOUT_S)
        except nats.errors.TimeoutError:  # (NoRespondersError is no TimeoutError: it passes)
            raise OpenAIError(
                503, f"the frontend process running response {question['id']} did not answer "
                f"within {ASK_TIMEOUT_S:g} s", type="service_unavailable", code="owner_unavailable",
            ) from None  # fmt: skip
        answer: dict[str, Any] = orjson.loads(msg.data)
        return answer

    async def _on_ask(self, msg: Msg) -> None:
        """Another process's question about a run of this one (each answered in a task of
        its own: a cancel waits for its run's end)."""
        self._spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        question = orjson.loads(msg.data)
        if question.get("op") == "cancel":
            done = await self._cancel_here(question["id"])
            await msg.respond(orjson.dumps({"response": done}))
            return
        run = self._runs.get(question.get("id", ""))
        if run is None:
            await msg.respond(b'{"error": "not_here"}')
            return
        if run.events is None:
            await msg.respond(b'{"error": "not_streamed"}')
            return
        await msg.respond(b'{"ok": true}')
        assert self._nats is not None
        inbox = question["inbox"]
        try:
            async for event in run.follow(int(question["after"])):
                await self._nats.publish(inbox, event)
        finally:
            with contextlib.suppress(Exception):
                await self._nats.publish(inbox, b"")  # the end

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _not_streamed(response_id: str) -> OpenAIError:
    return errors.bad_request(
        f"stream: response {response_id} was not created with stream true and background "
        "true: it has no events to stream; GET it without stream",
        param="stream",
    )


def _not_kept(response: dict[str, Any]) -> OpenAIError:
    if not response.get("background"):
        return _not_streamed(response["id"])
    return errors.bad_request(
        f"stream: the events of response {response['id']} are no longer kept (a finished "
        f"background response's events are kept {FINISHED_KEPT_S:g} s by the frontend "
        "process that ran it, while it runs); GET it without stream",
        param="stream",
    )

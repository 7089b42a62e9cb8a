"""The frontend's NATS side: send a request to a worker, receive its token stream, abort it.

One wildcard subscription `<inbox>.>` per process receives every reply; chunks are handed to
per-request queues by the last subject token (the request id). One subscription per request
would halve streaming throughput (see shared/notes/serving-facts.md). A request whose worker
leaves the WorkerDirectory gets a `WorkerLost` instead of waiting forever. A chunk naming a
`worker_id` moves the request to that worker (prefill_first hand-off to a decode worker).
With `frontend.busy_poll_us`, the event loop keeps polling while requests wait (see
`WorkerClient._keep_polling`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import TypeAdapter, ValidationError

from contract.bus import abort_subject, connect, load_metrics_subject, worker_subject
from contract.discovery import WorkerCard
from contract.messages import (
    BATCH_SUFFIX,
    PROTOCOL_VERSION,
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    LoadMetrics,
    request_json,
)
from frontend import errors
from frontend.nats_read_loop import no_responders, read_loop_hook, take_in_read_loop
from frontend.router import LoadTracker

logger = logging.getLogger(__name__)
# at debug level, each request's way through this process (sent to a worker, first output,
# released) with monotonic times: per-worker timelines of a run (benchmarks/router_timeline.py)
_timeline = logging.getLogger("frontend.timeline")

_BATCH = TypeAdapter(list[GenerateOutput])
_PAST_DEADLINE = object()  # queued by a request's deadline timer
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*"([^"]*)"')


class WorkerLost(Exception):
    """The worker serving a request left the directory (crash, lease lapse, shutdown)."""

    def __init__(self, worker_id: str, why: str = "left while serving the request") -> None:
        super().__init__(f"worker {worker_id} {why}")
        self.worker_id = worker_id


class NotListening(WorkerLost):
    """NATS had nobody on the worker's subject: it died (its card not yet gone), or it is
    re-subscribing after a NATS restart. The request never reached it."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id, "is not listening on its subject")


class ConnectionLost(WorkerLost):
    """NATS reconnected while the request streamed: chunks sent meanwhile may be gone, so
    the request continues afresh (the worker itself is fine: it is not excluded)."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id, "was cut off by a NATS reconnect")


class Inbox:
    """A request's replies as they arrive: asyncio.Queue's put_nowait/get/get_nowait/empty
    for the one task that reads them, without its getter bookkeeping (a c=1 request takes
    one reply through it: asyncio.Queue's get/put were ~3 % of the frontend's CPU there)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self._items.popleft()


class RequestStream:
    """The replies of one request; `close()` aborts it on the worker unless it finished."""

    __slots__ = (
        "_client", "_timer", "_timer_at", "card", "finished", "prefilled", "queue", "request_id",
    )  # fmt: skip

    def __init__(self, client: WorkerClient, card: WorkerCard, request_id: str) -> None:
        self._client = client
        self.card = card
        self.request_id = request_id
        self.queue = Inbox()  # bytes, GenerateOutput, an exception or _PAST_DEADLINE
        self.finished = False
        self.prefilled = False  # the first output arrived (routers stop counting its prefill)
        # one timer per request deadline, not one per wait (asyncio.timeout_at per token)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None

    async def next(self, deadline: float) -> GenerateOutput:
        """The next chunk; TimeoutError past `deadline` (loop time), WorkerLost if it left.

        A chunk that only announces a new owner (`worker_id`, nothing else) is consumed here.
        """
        while True:
            output = await self._next(deadline)
            if output.worker_id is None:
                return output
            self._client._reassign(self, output.worker_id)
            if output.token_ids or output.finish_reason is not None or output.logprobs:
                return output

    async def _next(self, deadline: float) -> GenerateOutput:
        queue = self.queue
        if queue.empty():
            if self._timer_at != deadline:  # the deadline puts _PAST_DEADLINE in the queue
                self.cancel_timer()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_at(deadline, queue.put_nowait, _PAST_DEADLINE)
                self._timer_at = deadline
            item = await queue.get()
        else:
            item = queue.get_nowait()
        if isinstance(item, GenerateOutput):  # from a batch: parsed already
            output = item
        elif item is _PAST_DEADLINE:
            self._timer = self._timer_at = None
            raise TimeoutError
        elif isinstance(item, BaseException):
            # a worker that left the directory may still be alive (a drain past its timeout
            # hands requests back): close() still sends it the abort; a dead one never hears it
            self.finished = not isinstance(item, WorkerLost)
            raise item
        else:
            try:
                output = GenerateOutput.model_validate_json(item)
            except ValidationError as exc:
                self.finished = True
                raise errors.worker_failed(
                    f"worker {self.card.worker_id} sent a malformed reply: {exc}"
                ) from None
        if output.version != PROTOCOL_VERSION:
            self.finished = True
            raise errors.worker_failed(
                f"worker {self.card.worker_id} speaks protocol version {output.version}, "
                f"this frontend {PROTOCOL_VERSION}"
            )
        if output.finish_reason is not None:
            self.finished = True
        if not self.prefilled and (output.token_ids or output.finish_reason is not None):
            self.prefilled = True
            if _timeline.isEnabledFor(logging.DEBUG):
                _timeline.debug("first output %s at %.4f", self.request_id, time.monotonic())
            self._client._tracker.prefilled(self.request_id)
        return output

    def close(self) -> None:
        """Idempotent; safe inside a cancelled task (the abort is published by its own task)."""
        self._client._release(self)


class WorkerClient:
    """NATS connection, the shared reply inbox, and the load-metrics subscription (only
    where the router reads load: `load_metrics`)."""

    def __init__(
        self,
        nats_url: str,
        deployment: str,
        tracker: LoadTracker,
        busy_poll_s: float = 0.0,
        load_metrics: bool = True,
    ) -> None:
        self._url = nats_url
        self._deployment = deployment
        self._tracker = tracker
        self._nc: NatsClient | None = None
        self._prefix = ""
        self._reply_prefix_len = 0
        self._streams: dict[str, RequestStream] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._workers: dict[str, WorkerCard] = {}  # the directory as last seen
        self._seen: set[str] = set()  # every worker id the directory ever listed
        self._busy_poll_s = busy_poll_s  # frontend.busy_poll_us
        self._poll_until = 0.0  # loop time the busy poll runs to (pushed on by activity)
        self._poller: asyncio.Task[None] | None = None
        self._load_metrics = load_metrics  # subscribe to the workers' LoadMetrics

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def busy_polling(self) -> bool:
        """Whether the event loop is kept polling now (`frontend.busy_poll_us`)."""
        return self._poller is not None

    @property
    def nats(self) -> NatsClient:
        """The connection (the media store serves its payloads on it too)."""
        assert self._nc is not None, "start() first"
        return self._nc

    async def start(self, name: str = "hpcserve-frontend") -> None:
        self._nc = await connect(self._url, name, reconnected=self._on_reconnected)
        self._prefix = self._nc.new_inbox()
        self._reply_prefix_len = len(self._prefix) + 1  # "<inbox>."
        if read_loop_hook(self._nc):  # each reply a task hop and a `Msg` sooner
            replies = await self._nc.subscribe(f"{self._prefix}.>")
            take_in_read_loop(self._nc, replies._id, self._take_reply)
        else:
            logger.warning("nats-py's _process_msg changed: replies go by callback")
            await self._nc.subscribe(f"{self._prefix}.>", cb=self._on_reply)
        if self._load_metrics:  # a router that reads no load leaves them unparsed
            await self._nc.subscribe(load_metrics_subject(self._deployment), cb=self._on_load)
        await self._nc.flush()
        logger.info("connected to NATS at %s; replies on %s.>", self._url, self._prefix)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(ConnectionError("the frontend is shutting down"))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._nc is not None:
            try:
                async with asyncio.timeout(5):
                    await self._nc.drain()
            except Exception as exc:  # NATS already gone: nothing left to flush
                logger.debug("NATS drain failed: %s", exc)
                with contextlib.suppress(Exception):
                    await self._nc.close()

    async def open(self, card: WorkerCard, request: GenerateRequest) -> RequestStream:
        """Register the reply queue, then publish the request to the worker."""
        assert self._nc is not None, "start() first"
        stream = RequestStream(self, card, request.request_id)
        self._streams[request.request_id] = stream
        self._tracker.started(card.worker_id)
        if _timeline.isEnabledFor(logging.DEBUG):
            _timeline.debug("sent %s to %s at %.4f", request.request_id, card.worker_id,
                            time.monotonic())  # fmt: skip
        if not request.batch_replies:  # `_on_reply` reads `<inbox>.batch`
            request.batch_replies = True
        try:
            await self._nc.publish(
                card.subject,
                request_json(request),
                reply=f"{self._prefix}.{request.request_id}",
            )
        except BaseException:
            stream.finished = True
            self._release(stream)
            raise
        if self._busy_poll_s:
            self._keep_polling()
        return stream

    def _keep_polling(self) -> None:
        """Busy poll (`frontend.busy_poll_us`): until `busy_poll_s` after this call, while
        requests wait, the loop turns without sleeping in epoll, so the reply finds the
        process running on a warm core instead of waking it (at c=1 on 16 idle cores, each
        wake-up of a sleeping process cost ~0.1-0.2 ms: benchmarks/README.md)."""
        loop = asyncio.get_running_loop()
        self._poll_until = loop.time() + self._busy_poll_s
        if self._poller is None:
            self._poller = loop.create_task(self._busy_poll())

    async def _busy_poll(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._streams and loop.time() < self._poll_until:
                await asyncio.sleep(0)  # one loop turn: its epoll does not wait
        finally:
            self._poller = None

    def _release(self, stream: RequestStream) -> None:
        stream.cancel_timer()
        if self._streams.pop(stream.request_id, None) is None:
            return
        self._tracker.finished(stream.card.worker_id, stream.request_id)
        if _timeline.isEnabledFor(logging.DEBUG):
            _timeline.debug("released %s at %.4f", stream.request_id, time.monotonic())
        if not stream.finished:
            stream.finished = True
            self._publish_soon(
                stream.card.abort_subject,
                AbortRequest(request_id=stream.request_id).model_dump_json().encode(),
            )

    def _reassign(self, stream: RequestStream, worker_id: str) -> None:
        """`worker_id` took the request over: aborts and the liveness watch follow it."""
        if stream.finished or worker_id == stream.card.worker_id:
            return
        old = stream.card.worker_id
        card = self._workers.get(worker_id)
        if card is None:  # not in our view of the directory (yet): address it by convention
            card = stream.card.model_copy(
                update={
                    "worker_id": worker_id,
                    "role": "decode",
                    "subject": worker_subject(self._deployment, worker_id),
                    "abort_subject": abort_subject(self._deployment, worker_id),
                    "kv_transfer": None,
                }
            )
        logger.debug("request %s moved from %s to %s", stream.request_id, old, worker_id)
        stream.card = card
        if self._streams.get(stream.request_id) is stream:
            self._tracker.finished(old)  # no request id: the request itself goes on
            self._tracker.started(worker_id)
        if worker_id in self._seen and worker_id not in self._workers:
            stream.queue.put_nowait(WorkerLost(worker_id))  # it already left

    def _publish_soon(self, subject: str, payload: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(subject, payload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish(self, subject: str, payload: bytes) -> None:
        try:
            assert self._nc is not None
            await self._nc.publish(subject, payload)
        except Exception as exc:
            logger.warning("could not publish to %s: %s", subject, exc)

    def _take_reply(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        """A reply, from nats-py's read loop (`take_in_read_loop`)."""
        self._reply(subject[self._reply_prefix_len :].decode(), data, no_responders(headers))

    async def _on_reply(self, msg: Msg) -> None:
        """A reply, from the subscription's task (a nats-py without the read-loop hook)."""
        status = msg.headers.get("Status") if msg.headers else None
        self._reply(msg.subject[self._reply_prefix_len :], msg.data, status == "503")

    def _reply(self, request_id: str, data: bytes, nobody_listens: bool) -> None:
        if request_id == BATCH_SUFFIX:
            self._on_batch(data)
            return
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if self._busy_poll_s:
            self._keep_polling()
        if not data and nobody_listens:
            # NATS "no responders": nobody listens on the worker's subject (it died and its
            # lease has not lapsed yet); fail over now instead of waiting for the TTL
            stream.queue.put_nowait(NotListening(stream.card.worker_id))
            return
        stream.queue.put_nowait(data)

    def _on_batch(self, data: bytes) -> None:
        """Chunks of several requests that one worker step produced (`batch_replies`)."""
        streams = self._streams
        if self._busy_poll_s:
            self._keep_polling()
        try:
            outputs = _BATCH.validate_json(data)
        except ValidationError as exc:  # fail the requests it names rather than let them wait
            logger.error("malformed batch of replies: %s", exc)
            for match in _REQUEST_ID.finditer(data):
                stream = streams.get(match.group(1).decode(errors="replace"))
                if stream is not None:
                    why = f"worker {stream.card.worker_id} sent a malformed reply: {exc}"
                    stream.queue.put_nowait(errors.worker_failed(why))
            return
        for output in outputs:
            stream = streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)

    async def _on_reconnected(self) -> None:
        """Every stream open across a NATS reconnect continues afresh (migration)."""
        logger.warning("NATS reconnected; %d open request(s) continue afresh", self.in_flight)
        for stream in list(self._streams.values()):
            if not stream.finished:
                stream.queue.put_nowait(ConnectionLost(stream.card.worker_id))

    async def _on_load(self, msg: Msg) -> None:
        try:
            self._tracker.update(LoadMetrics.model_validate_json(msg.data))
        except ValueError as exc:
            logger.warning("ignoring malformed load metrics: %s", exc)

    def on_workers_changed(self, workers: Mapping[str, WorkerCard]) -> None:
        """WorkerDirectory listener: fail the requests of workers that left."""
        self._workers = dict(workers)
        self._seen.update(workers)
        for stream in list(self._streams.values()):
            if stream.card.worker_id not in workers and not stream.finished:
                stream.queue.put_nowait(WorkerLost(stream.card.worker_id))
        for worker_id in list(self._tracker.metrics):
            if worker_id not in workers:
                self._tracker.forget(worker_id)

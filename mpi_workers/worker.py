"""The worker process: one engine, registered in etcd, serving requests from NATS.

Life of a worker:
1. build and start the engine; 2. subscribe to its generate and abort subjects;
3. register its `WorkerCard` in etcd under a lease (kept alive); 4. serve: every
`GenerateRequest` runs in its own task that streams each `GenerateOutput` chunk as JSON to the
request's reply subject; 5. publish `LoadMetrics` every `METRICS_INTERVAL_S` and at most
`METRICS_POLL_S` after a request starts or ends, and the engine's KV events as seq-numbered
`KvEventBatch`es (a scheduler-driven engine's replies, KV events and load reports of one step
go out from one publishing task, in one pass);
6. on SIGTERM/SIGINT: mark the card draining so no new requests come, let in-flight
requests finish (bounded by `drain_timeout_s`), deregister, shut the engine down, exit 0.
When the engine reports a fatal failure (a tensor-parallel rank died): withhold its error
replies and deregister at once, so the frontend migrates the requests; exit 1.

Several simulated workers in one process (`workers.N.per_process`): each `Worker` keeps its
own id, card, lease and subjects, and they share the process's event loop and one NATS
connection (`Worker.use_connection`), which `serve_until_signal` opens and closes. Each
worker's tasks log with its own tag (`mpi_workers.logging_setup.worker_log_tag`); one
worker's fatal engine failure stops them all (the supervisor restarts the process).

Images. A request with `media` names payloads the frontend serves on its media subject: the
worker fetches each (`contract.media.fetch_media`, size and hash checked), has the engine
decode and preprocess them in a thread (`Engine.prepare_media`), then generates with them.
A payload the engine cannot use is a bad request (ValueError naming "messages"); one that
cannot be fetched ends the request with an error chunk.

Bad requests. The engine raises `ValueError` naming the parameter before any work; the worker
answers with one final chunk: finish_reason "error", `error` = the message, `error_param` =
the parameter. Convention (shared with the engine): the exception has a `param` attribute, or
its message starts with the parameter's name, followed by ':' or a space
("max_tokens: must be >= 1", "temperature must be >= 0"). Only names of `GenerateRequest` and
`SamplingParams` fields, and "messages" (a bad image), are taken as parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from pydantic import ValidationError

from contract import bus
from contract.discovery import WorkerCard, WorkerRegistration
from contract.media import MediaUnavailable, fetch_media
from contract.messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    KvEvent,
    KvSnapshot,
    SamplingParams,
    batch_subject,
    kv_batch_json,
    output_fields,
    output_json,
)
from mpi_workers.engine.base import Engine
from mpi_workers.engine.streaming import Chunk, OutputStream, coalesce_chunks
from mpi_workers.logging_setup import worker_log_tag

logger = logging.getLogger(__name__)

METRICS_INTERVAL_S = 0.5  # at least this often
METRICS_POLL_S = 0.05  # after a change, at most this late
MEDIA_FETCH_TIMEOUT_S = 30.0  # per chunk of an image payload from the frontend
# "messages": the chat request's field that holds the images (their payloads are refused
# by the worker, which only sees `media`)
_PARAM_NAMES = (
    frozenset(GenerateRequest.model_fields) | frozenset(SamplingParams.model_fields) | {"messages"}
)
_LEADING_NAME = re.compile(r"^\s*['\"`]?([A-Za-z_][A-Za-z0-9_]*)['\"`]?\s*(?::|\s|$)")


def error_param(exc: Exception) -> str | None:
    """The request parameter a ValueError is about (see the module docstring)."""
    param = getattr(exc, "param", None)
    if isinstance(param, str) and param:
        return param
    match = _LEADING_NAME.match(str(exc))
    if match and match.group(1) in _PARAM_NAMES:
        return match.group(1)
    return None


class Worker:
    """One engine served over NATS and registered in etcd. Use `start()`, then `stop()`."""

    def __init__(
        self,
        engine: Engine,
        *,
        deployment: str,
        worker_id: str,
        role: str,
        nats_url: str,
        etcd_endpoint: str,
        lease_ttl_s: int,
        capacity: int,
        model_name: str | None = None,
        drain_timeout_s: float = 30.0,
        log_tag: str | None = None,
    ) -> None:
        """`log_tag`: what this worker's log lines say instead of the process's tag (a
        process hosting several)."""
        self.engine = engine
        self.log_tag = log_tag
        self._shared_nc: Any = None  # see use_connection
        self.deployment = deployment
        self.worker_id = worker_id
        self.role = role
        self.nats_url = nats_url
        self.etcd_endpoint = etcd_endpoint
        self.lease_ttl_s = lease_ttl_s
        self.capacity = capacity
        self.model_name = model_name or engine.model_name
        self.drain_timeout_s = drain_timeout_s
        self.subject = bus.worker_subject(deployment, worker_id)
        self.abort_subject = bus.abort_subject(deployment, worker_id)
        self._nc = None
        self._subscriptions: list = []
        self._registration: WorkerRegistration | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._metrics_changed = False  # a request started or ended since the last report
        self._metrics_sent_at = -1e9  # loop.time() of the last load report
        self._outbox_at = -1e9  # loop.time() of the replies' publisher's last pass
        self._metrics_waiter: asyncio.Future[None] | None = None
        self._kv_pending: list[list[KvEvent]] = []  # the engine's batches, not yet published
        self._kv_seq = 0
        # (reply subject, batch subject or None, chunk) not yet published
        self._outbox: list[tuple[str, str | None, Chunk]] = []
        self._outbox_ready = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed_reason: str | None = None  # set when the engine failed for good
        self.failed = asyncio.Event()

    @property
    def card(self) -> WorkerCard:
        return WorkerCard(
            worker_id=self.worker_id,
            role=self.role,
            model=self.model_name,
            block_size=self.engine.block_size,
            subject=self.subject,
            abort_subject=self.abort_subject,
            capacity=self.capacity,
            max_model_len=self.engine.max_model_len,
            simulated=self.engine.simulated,
            engine=self.engine.kind,
            unsupported_params=sorted(self.engine.unsupported_params | self._role_unsupported()),
            media=sorted(self.engine.media_kinds),
            # a prefill or decode worker runs half a generation: it embeds nothing
            tasks=sorted(self.engine.tasks if self.role == "agg" else {"generate"}),
        )

    def _role_unsupported(self) -> frozenset[str]:
        """What this worker cannot do for its role: a prefill or decode worker of a
        disaggregated deployment does not carry the prompt's logprobs across the hand-off
        (the prefill worker computes the prompt, the decode worker streams the answer). An
        output constraint crosses it on the torch engine only (its prefill side constrains
        the first token, its decode side's matcher consumes it first: `disagg_ops`);
        TensorRT-LLM's generation-only phase is not known to feed its grammar the first
        token, so its prefill and decode workers refuse constraints."""
        if self.role == "agg":
            return frozenset()
        if self.engine.kind == "torch":
            return frozenset({"prompt_logprobs"})
        return frozenset({"prompt_logprobs", "guided"})

    def use_connection(self, nc: Any) -> None:
        """Serve on `nc` (before `start`), a NATS connection the caller owns and closes: the
        workers of one process share one. Without it the worker opens and closes its own."""
        self._shared_nc = nc

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.engine.start()
        self.engine.set_kv_event_sink(self._kv_sink)
        self.engine.set_fatal_handler(self._on_engine_fatal)
        if self._shared_nc is not None:
            self._nc = self._shared_nc
        else:
            self._nc = await bus.connect(self.nats_url, name=f"worker-{self.worker_id}")
        self._subscriptions = [
            await self._nc.subscribe(self.subject, cb=self._on_generate),
            await self._nc.subscribe(self.abort_subject, cb=self._on_abort),
            await self._nc.subscribe(
                bus.kv_snapshot_subject(self.deployment, self.worker_id), cb=self._on_kv_snapshot
            ),
        ]
        self._background = [
            asyncio.create_task(self._publish_metrics_forever(), name="load-metrics"),
            asyncio.create_task(self._publish_outbox_forever(), name="replies-and-kv"),
        ]
        self._registration = WorkerRegistration(
            self.etcd_endpoint, self.deployment, self.card, self.lease_ttl_s
        )
        await self._registration.open()
        logger.info(
            "registered %s (model %s, capacity %d) on %s",
            self.worker_id, self.model_name, self.capacity, self.subject,
        )  # fmt: skip

    async def stop(self) -> None:
        """Drain, deregister, shut the engine down.

        Healthy (SIGTERM, `hpcserve drain`): the card is marked draining (routers send no
        more; the frontend keeps the streams), in-flight requests finish, bounded by
        `drain_timeout_s`; what is left then is cancelled unanswered and the card removed,
        so the frontend migrates those requests instead of seeing them aborted. After a
        fatal engine failure nothing can finish: the card goes at once (the frontend
        migrates every stream; the engine's error replies were withheld)."""
        registration, self._registration = self._registration, None
        if registration is not None and self.failed_reason is None:
            with contextlib.suppress(Exception):
                await registration.mark_draining()
            logger.info("draining %d in-flight request(s); no new ones", self.inflight)
            deadline = time.monotonic() + self.drain_timeout_s
            while self._inflight and time.monotonic() < deadline:
                await asyncio.wait(list(self._inflight.values()),
                                   timeout=deadline - time.monotonic())  # fmt: skip
            if self._inflight:
                logger.warning("drain timed out; handing %d request(s) back to the frontend",
                               self.inflight)  # fmt: skip
        for task in list(self._inflight.values()):
            task.cancel()  # unanswered: the frontend migrates them once the card is gone
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=5)
        if self._nc is not None:
            # The last tokens must reach the frontend before the card goes: it watches etcd
            # and NATS apart, and a card gone first would read as a worker lost mid-stream.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
        if registration is not None:
            await registration.close()
            logger.info("deregistered")
        self.engine.set_kv_event_sink(None)
        await self.engine.shutdown()  # unfinished requests end with finish_reason "abort"
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=5)
        for task in self._inflight.values():
            task.cancel()
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._nc is not None and self._shared_nc is None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()
        logger.info("stopped")

    def _on_engine_fatal(self, reason: str) -> None:
        """Called from an engine thread: the engine cannot serve any more; stop the worker."""
        self.failed_reason = reason
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.failed.set)

    # request plane

    async def _on_generate(self, msg) -> None:
        try:
            request = GenerateRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.error("malformed GenerateRequest: %s", exc)
            request_id = _request_id_of(msg.data)
            await self._reply_error(msg.reply, request_id, f"malformed request: {exc}", None)
            return
        if request.version != PROTOCOL_VERSION:
            await self._reply_error(
                msg.reply, request.request_id,
                f"protocol version {request.version} not supported; worker speaks "
                f"{PROTOCOL_VERSION}", "version",
            )  # fmt: skip
            return
        if not msg.reply:
            logger.error("request %s has no reply subject; dropped", request.request_id)
            return
        logger.debug("request %s: %d prompt tokens", _named(request), len(request.token_ids))
        task = asyncio.create_task(self._serve(request, msg.reply), name=request.request_id)
        self._inflight[request.request_id] = task
        task.add_done_callback(lambda _t, rid=request.request_id: self._request_done(rid))
        self._note_load_change()

    def _request_done(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)
        self._note_load_change()

    def _note_load_change(self) -> None:
        """A request started or ended: the load report is due (at most `METRICS_POLL_S`
        after the last). While the engine steps, the replies' publisher sends it with a
        step's replies; otherwise (`_metrics_quiet`) the metrics task is woken for it."""
        self._metrics_changed = True
        waiter = self._metrics_waiter
        if waiter is not None and not waiter.done() and self._metrics_quiet():
            waiter.set_result(None)

    def _metrics_quiet(self) -> bool:
        """No request in flight, or no replies published lately: the replies' publisher
        will not send the next load report; the metrics task must."""
        assert self._loop is not None
        return not self._inflight or self._loop.time() - self._outbox_at > METRICS_POLL_S

    async def _serve(self, request: GenerateRequest, reply: str) -> None:
        assert self._nc is not None
        finished = False
        try:
            if request.pooling is not None and "embed" not in self.engine.tasks:
                raise ValueError(  # the frontend routes embeddings to able workers only
                    f"pooling: engine {self.engine.kind} of model {self.model_name} makes no "
                    "embeddings"
                )
            media = await self.prepare_media(request)
            if media is None:
                stream = self.engine.generate(request)
            else:
                stream = self.engine.generate(request, media=media)
            if isinstance(stream, OutputStream):  # a scheduler-driven engine: no per-token hop
                await self._serve_listening(stream, reply, request.batch_replies)
                return
            async for output in stream:
                if output.finish_reason == "error" and self.engine.failed is not None:
                    return  # the engine, not the request, failed: withheld, and the
                    # frontend migrates the request once this worker's card is gone
                await self._nc.publish(reply, output_json(output))
                finished = output.finish_reason is not None
        except ValueError as exc:
            logger.info("rejected %s: %s", _named(request), exc)
            await self._reply_error(reply, request.request_id, str(exc), error_param(exc))
            return
        except MediaUnavailable as exc:
            logger.warning("%s: %s", _named(request), exc)
            await self._reply_error(reply, request.request_id, f"image unavailable: {exc}", None)
            return
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.engine.abort(request.request_id)
            raise
        except Exception as exc:
            logger.exception("request %s failed", _named(request))
            await self._reply_error(reply, request.request_id, f"engine error: {exc}", None)
            return
        if not finished:  # the stream must always end with a finish reason
            await self._reply_error(
                reply, request.request_id, "engine stream ended without finish_reason", None
            )

    async def prepare_media(self, request: GenerateRequest) -> Any:
        """The engine's inputs for `request.media` (None for a text request): the request is
        validated first, then every payload fetched from the frontend at once and prepared
        in a thread. ValueError naming the field; MediaUnavailable."""
        if not request.media:
            return None
        missing = {ref.kind for ref in request.media} - self.engine.media_kinds
        if missing:
            raise ValueError(
                f"messages: engine {self.engine.kind} of model {self.model_name} takes no "
                f"{' or '.join(sorted(missing))} input"
            )  # "messages" is a parameter name here (see error_param)
        self.engine.validate(request)  # before any byte is fetched
        assert self._nc is not None
        nc = self._nc
        fetches = [
            fetch_media(nc, ref.subject, ref.media_id, ref.nbytes, ref.content_hash,
                        timeout_s=MEDIA_FETCH_TIMEOUT_S)
            for ref in request.media
        ]  # fmt: skip
        payloads = await asyncio.gather(*fetches)
        return await asyncio.to_thread(self.engine.prepare_media, request, list(payloads))

    async def _serve_listening(self, stream: OutputStream, reply: str, batch: bool) -> None:
        """Each output goes straight into the outbox (`_publish_outbox_forever` sends what
        a step produced for all requests in one wake-up); this task only waits for the end.
        Cancelled (drain timeout, stop): the engine aborts the request, as with iteration."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch_to = batch_subject(reply) if batch else None

        def on_output(chunk: Chunk) -> None:
            if chunk.finish_reason is not None and not done.done():
                done.set_result(None)
            if chunk.finish_reason == "error" and self.engine.failed is not None:
                return  # withheld: the frontend migrates the request (see above)
            self._outbox.append((reply, batch_to, chunk))
            self._outbox_ready.set()

        stream.listen_chunks(on_output)
        try:
            await done
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await stream.aclose()
            raise

    async def _publish_outbox_forever(self) -> None:
        """What the last step(s) produced: one message per request, except that the chunks
        of requests whose sender reads batches go as one message per sender's inbox (one
        JSON array, encoded in one call); a request's chunks of several steps (a fast
        engine) go as one (`coalesce_chunks`). Then the engine's KV events of every step since
        the last pass, as one batch with the next `seq` (every frontend process pays for each
        message it receives), published once the replies are on the socket: a frontend that
        gets both handles the reply first."""
        assert self._nc is not None
        kv_subject = bus.kv_events_subject(self.deployment)
        loop = asyncio.get_running_loop()
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            pending, self._outbox = self._outbox, []
            kv_batches, self._kv_pending = self._kv_pending, []
            batches: dict[str, list[dict[str, Any] | orjson.Fragment]] = {}
            messages: list[tuple[str, bytes]] = []
            routes = {chunk.request_id: (reply, batch_to) for reply, batch_to, chunk in pending}
            for chunk in coalesce_chunks([chunk for _, _, chunk in pending]):
                reply, batch_to = routes[chunk.request_id]
                if batch_to is None:
                    messages.append((reply, orjson.dumps(_wire(chunk))))
                else:
                    batches.setdefault(batch_to, []).append(_wire(chunk))
            for batch_to, items in batches.items():
                messages.append((batch_to, orjson.dumps(items)))
            for subject, payload in messages:
                try:
                    await self._nc.publish(subject, payload)
                except Exception as exc:  # the frontend times the request out
                    logger.warning("reply to %s not published: %s", subject, exc)
            if kv_batches:
                if messages:
                    await asyncio.sleep(0)  # nats-py's flusher writes the replies first
                events = kv_batches[0] if len(kv_batches) == 1 else [
                    event for step in kv_batches for event in step
                ]  # fmt: skip
                self._kv_seq += 1
                try:
                    await self._nc.publish(
                        kv_subject, kv_batch_json(self.worker_id, self._kv_seq, events)
                    )
                except Exception as exc:
                    logger.warning("KV event batch %d not published: %s", self._kv_seq, exc)
            self._outbox_at = now = loop.time()
            if self._metrics_changed and now - self._metrics_sent_at >= METRICS_POLL_S:
                await self._publish_metrics()  # with this step's replies: no wake-up of its own

    async def _reply_error(
        self, reply: str, request_id: str, error: str, param: str | None
    ) -> None:
        if not reply or self._nc is None:
            return
        if self.engine.failed is not None:
            return  # the engine failed, not the request: the frontend migrates it
        chunk = GenerateOutput(
            request_id=request_id, finish_reason="error", error=error, error_param=param
        )
        with contextlib.suppress(Exception):
            await self._nc.publish(reply, output_json(chunk))

    async def _on_abort(self, msg) -> None:
        try:
            request = AbortRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.error("malformed AbortRequest: %s", exc)
            return
        logger.debug("abort %s", request.request_id)
        try:
            await self.engine.abort(request.request_id)
        except Exception:
            logger.exception("abort of %s failed", request.request_id)

    # event plane

    def _kv_sink(self, events: list[KvEvent]) -> None:
        """Called by the engine once per step with events: from its stepping thread (hop
        onto the event loop), or on the loop itself (the mocker: no wake-up of the loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if asyncio._get_running_loop() is loop:
            self._queue_kv(events)
        else:
            loop.call_soon_threadsafe(self._queue_kv, events)

    def _queue_kv(self, events: list[KvEvent]) -> None:
        """On the loop: the replies' publisher sends the batch (after the step's replies)."""
        self._kv_pending.append(events)
        self._outbox_ready.set()

    async def _on_kv_snapshot(self, msg) -> None:
        """Reply with every cached block hash as of the last published batch `seq`.

        Batches still queued get higher seqs than the one reported, so a router that replaces
        its view with this snapshot and then applies the later batches converges.
        """
        if not msg.reply:
            return
        hashes: list[int] = []
        for _ in range(5):  # the stepping thread may mutate the cache while we copy it
            try:
                hashes = self.engine.cached_block_hashes()
                break
            except RuntimeError:
                await asyncio.sleep(0)
        snapshot = KvSnapshot(worker_id=self.worker_id, seq=self._kv_seq, block_hashes=hashes)
        try:
            await self._nc.publish(msg.reply, snapshot.model_dump_json().encode())
        except Exception as exc:
            logger.warning("KV snapshot not sent: %s", exc)

    async def _publish_metrics_forever(self) -> None:
        """Load reports: every `METRICS_INTERVAL_S`, and at most `METRICS_POLL_S` after a
        request started or ended. While the engine steps, the replies' publisher sends the
        latter with a step's replies, and this task sleeps the interval (it used to poll
        every `METRICS_POLL_S`: a wake-up of an idle worker 20 times a second)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self._metrics_changed and self._metrics_quiet():
                due = self._metrics_sent_at + METRICS_POLL_S
            else:
                due = self._metrics_sent_at + METRICS_INTERVAL_S
            if now < due:
                # A plain timer and future: asyncio.wait_for on an Event can hang on cancel
                # in Python 3.11. `_note_load_change` ends the wait early.
                waiter = self._metrics_waiter = loop.create_future()
                timer = loop.call_later(due - now, _resolve, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._metrics_waiter = None
                continue
            await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        assert self._loop is not None and self._nc is not None
        self._metrics_changed, self._metrics_sent_at = False, self._loop.time()
        try:
            metrics = self.engine.load_metrics()
            metrics.worker_id = self.worker_id
            await self._nc.publish(
                bus.load_metrics_subject(self.deployment), metrics.model_dump_json().encode()
            )
        except Exception as exc:
            logger.warning("load metrics not published: %s", exc)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wire(chunk: Chunk) -> dict[str, Any] | orjson.Fragment:
    """`chunk` as `output_json` writes its `GenerateOutput` (fields at their defaults left
    out), as a dict orjson encodes with the rest of its message."""
    if chunk.logprobs is not None or chunk.prompt_logprobs is not None:  # nested models
        return orjson.Fragment(output_json(chunk.output()))
    return output_fields(
        chunk.request_id, chunk.token_ids, chunk.finish_reason, chunk.num_prompt_tokens,
        chunk.num_cached_tokens, chunk.error, embedding=chunk.embedding,
    )  # fmt: skip


def _named(request: GenerateRequest) -> str:
    """A request as log lines name it: its attempt id and the id its client sees."""
    if request.client_id:
        return f"{request.request_id} (client {request.client_id})"
    return request.request_id


def _request_id_of(data: bytes) -> str:
    match = re.search(rb'"request_id"\s*:\s*"([^"]*)"', data)
    return match.group(1).decode(errors="replace") if match else ""


async def serve_until_signal(
    workers: Sequence[Worker], on_ready: Callable[[], None] | None = None
) -> None:
    """Start `workers` (one, or the simulated workers a process hosts), serve until SIGTERM,
    SIGINT or a fatal engine failure of any, then stop them all (`failed_reason` tells the
    last case apart). Several share one NATS connection, opened here and closed last."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    shared = None
    if len(workers) > 1:
        first = workers[0]
        shared = await bus.connect(first.nats_url, name=f"workers-{first.worker_id}+")
        for worker in workers:
            worker.use_connection(shared)
    try:
        await asyncio.gather(*(_as_worker(worker, worker.start()) for worker in workers))
        if on_ready is not None:
            on_ready()
        waits = [asyncio.create_task(stopping.wait())]
        waits += [asyncio.create_task(worker.failed.wait()) for worker in workers]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        failed = [worker for worker in workers if worker.failed_reason is not None]
        for worker in failed:
            logger.error("%s: engine failed (%s); deregistering and exiting",
                         worker.worker_id, worker.failed_reason)  # fmt: skip
        if not failed:
            logger.info("signal received; stopping")
        await asyncio.gather(*(_as_worker(worker, worker.stop()) for worker in workers))
    finally:
        if shared is not None:
            with contextlib.suppress(Exception):
                await shared.flush(timeout=2)
            with contextlib.suppress(Exception):
                await shared.close()


def _as_worker(worker: Worker, step: Awaitable[None]) -> asyncio.Task[None]:
    """`step` in a task of its own whose log lines carry `worker.log_tag`: the tasks it
    creates (subscriptions, requests, engine loop) inherit that context, and with it the tag."""

    async def tagged() -> None:
        if worker.log_tag is not None:
            worker_log_tag.set(worker.log_tag)
        await step

    return asyncio.create_task(tagged(), name=f"{worker.worker_id}")

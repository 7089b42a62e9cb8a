"""`StreamingEngine`: the asyncio plumbing every scheduler-driven engine shares.

An engine built on `BlockManager` + `Scheduler` (the torch engine, the mocker) streams each
request's outputs into a per-request asyncio queue. This module owns that side once:
request validation (`RequestValidationError` naming the field), the stream registry, output
delivery from the stepping side (a thread or the event loop), finishing a sequence, load
metrics and KV event publishing. A subclass keeps only how it steps (`start`, `shutdown`,
`generate`, `abort`, `abort_nowait`) and what it counts when a sequence finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    LoadMetrics,
    SamplingParams,
    TokenLogprob,
    logit_bias_vocab_error,
    sampling_range_error,
)
from mpi_workers.engine.base import Engine, KvEventSink

if TYPE_CHECKING:
    from mpi_workers.engine.block_manager import BlockManager
    from mpi_workers.engine.scheduler import Scheduler
    from mpi_workers.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class RequestValidationError(ValueError):
    """A bad request; `param` names the offending field (also first in the message)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def validate_request(request: GenerateRequest, max_model_len: int, vocab_size: int) -> None:
    """Raise RequestValidationError naming the first bad field of `request`."""
    ids = request.token_ids
    p: SamplingParams = request.sampling
    if not ids:
        raise RequestValidationError("token_ids", "the prompt is empty")
    if request.pooling is not None:  # an embedding: the prompt alone, no output after it
        if len(ids) > max_model_len:
            raise RequestValidationError(
                "token_ids", f"prompt of {len(ids)} tokens is over max_model_len {max_model_len}"
            )
    elif len(ids) >= max_model_len:
        raise RequestValidationError(
            "token_ids",
            f"prompt of {len(ids)} tokens leaves no room under max_model_len {max_model_len}",
        )
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise RequestValidationError("token_ids", f"ids must lie in [0, {vocab_size})")
    bad = sampling_range_error(p)
    if bad is not None:
        raise RequestValidationError(*bad)
    if any(t < 0 or t >= vocab_size for t in p.stop_token_ids):
        raise RequestValidationError("stop_token_ids", f"ids must lie in [0, {vocab_size})")
    bad = logit_bias_vocab_error(p.logit_bias, vocab_size) if p.logit_bias else None
    if bad is not None:
        raise RequestValidationError(*bad)


class Chunk(NamedTuple):
    """One output as the stepping side makes it: `GenerateOutput`'s fields, not validated
    (the engine built them). A listener that only forwards outputs (the worker: to JSON and
    NATS) takes these and pays for no model per request per step; `output()` is the model
    an iterating caller gets."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None
    prompt_logprobs: list[TokenLogprob] | None = None  # the request's first chunk only
    embedding: str | None = None  # an embedding request's one chunk

    def output(self) -> GenerateOutput:
        return GenerateOutput(
            request_id=self.request_id,
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
            error=self.error,
            prompt_logprobs=self.prompt_logprobs,
            embedding=self.embedding,
        )

    def then(self, later: Chunk) -> Chunk | None:
        """This chunk and the same request's `later` one as one chunk (both chunks' tokens
        and logprobs, the later one's counts and finish reason), or None where the protocol
        keeps them apart (after a finish or an error; with logprobs on one side only): a
        chunk carries the tokens produced since the previous one."""
        if (
            self.finish_reason is not None
            or self.error is not None
            or (self.logprobs is None) != (later.logprobs is None)
            or later.prompt_logprobs is not None
        ):
            return None
        return later._replace(
            prompt_logprobs=self.prompt_logprobs,
            token_ids=self.token_ids + later.token_ids,
            logprobs=None if later.logprobs is None else self.logprobs + later.logprobs,  # type: ignore[operator]
            num_prompt_tokens=later.num_prompt_tokens or self.num_prompt_tokens,
            num_cached_tokens=later.num_cached_tokens or self.num_cached_tokens,
        )


def coalesce_chunks(chunks: list[Chunk]) -> list[Chunk]:
    """`chunks` (in order) with each request's consecutive chunks joined where the
    protocol allows (`Chunk.then`: a fast engine's chunks of several steps that meet in the
    worker's outbox go as one); chunks of other requests keep their order."""
    if len(chunks) < 2:
        return chunks
    result: list[Chunk] = []
    last: dict[str, int] = {}  # request id -> index in result of its latest chunk
    for chunk in chunks:
        index = last.get(chunk.request_id)
        if index is not None:
            joined = result[index].then(chunk)
            if joined is not None:
                result[index] = joined
                continue
        last[chunk.request_id] = len(result)
        result.append(chunk)
    return result


class _Stream:
    """The caller's side of one request: where its outputs go (pushed from any thread):
    its queue (made on first use: a listening caller never needs one), or once the caller
    `listen`s, straight to its callback."""

    __slots__ = ("_queue", "listener", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: asyncio.Queue[Chunk] | None = None
        self.listener: Callable[[Chunk], None] | None = None

    @property
    def queue(self) -> asyncio.Queue[Chunk]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def push(self, chunk: Chunk, running: asyncio.AbstractEventLoop | None) -> None:
        """`running`: the pusher's running loop (`asyncio._get_running_loop()`, asked once
        per step by the caller: in Python 3.11 each call is a getpid() system call)."""
        if running is self.loop:  # the mocker: steps on this loop
            self.deliver(chunk)
            return
        # A stepping thread (no loop of its own). RuntimeError: the caller's loop is
        # closed; nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.deliver, chunk)

    def deliver(self, chunk: Chunk) -> None:
        """On the caller's loop (so a `listen` in between keeps the order)."""
        if self.listener is not None:
            self.listener(chunk)
        else:
            self.queue.put_nowait(chunk)


class StreamingEngine(Engine):
    """Streams, validation, delivery and events over a `BlockManager` and a `Scheduler`.

    Subclasses set `block_manager`, `scheduler`, `max_model_len`, `vocab_size` and call
    `_init_streaming()`; they implement `abort_nowait` (abort from sync code, any thread).
    """

    block_manager: BlockManager
    scheduler: Scheduler

    def _init_streaming(self) -> None:
        self._sink: KvEventSink | None = None
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()

    # ----- requests ------------------------------------------------------------------------
    def validate(self, request: GenerateRequest) -> None:
        """Raise RequestValidationError (a ValueError) naming the first bad field."""
        validate_request(request, self.max_model_len, self.vocab_size)
        with self._streams_lock:
            if request.request_id in self._streams:
                raise RequestValidationError("request_id", "a request with this id is running")

    def _open_stream(self, request_id: str) -> OutputStream:
        """Register the caller's queue for `request_id` (call from the caller's loop)."""
        stream = _Stream(asyncio.get_running_loop())
        with self._streams_lock:
            self._streams[request_id] = stream
        return OutputStream(self, request_id, stream)

    def abort_nowait(self, request_id: str) -> None:
        """Ask for an abort without waiting (sync code: a cancelled or dropped stream)."""
        raise NotImplementedError

    # ----- observation ---------------------------------------------------------------------
    def load_metrics(self) -> LoadMetrics:
        bm = self.block_manager
        free = bm.num_free_blocks
        return LoadMetrics(
            active_sequences=len(self.scheduler.running),
            waiting_sequences=len(self.scheduler.waiting),
            total_blocks=bm.num_blocks,
            free_blocks=free,
            active_blocks=bm.num_blocks - free,
        )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return self.block_manager.cached_hashes()

    # ----- the stepping side ---------------------------------------------------------------
    def _on_finish(self, seq: Sequence, reason: str) -> None:
        """Count a finishing sequence (called before it leaves the scheduler)."""

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self._on_finish(seq, reason)
        seq.finish_reason = reason
        seq.error = error
        self.scheduler.remove(seq)
        self._deliver(seq)
        with self._streams_lock:
            self._streams.pop(seq.request_id, None)

    def _deliver(self, seq: Sequence) -> None:
        """Send the tokens produced since the last chunk (and the finish reason, if any)."""
        self._deliver_all((seq,))

    def _deliver_all(self, seqs: Iterable[Sequence]) -> None:
        """`_deliver` for each of `seqs` in order: one lock and one look-up of what their
        chunks share (the mocker delivers every running request's token each step)."""
        logprobs_ok = "logprobs" not in self.unsupported_params
        running = asyncio._get_running_loop()  # None on a stepping thread
        with self._streams_lock:
            targets = [(seq, self._streams.get(seq.request_id)) for seq in seqs]
        for seq, stream in targets:
            logprobs = None
            if seq.pending_logprobs or seq.sampling.logprobs is not None:
                if logprobs_ok and seq.sampling.logprobs is not None:
                    logprobs = seq.pending_logprobs
                seq.pending_logprobs = []
            chunk = Chunk(
                seq.request_id,
                seq.pending_tokens,
                logprobs,
                seq.finish_reason,
                seq.num_prompt_tokens,
                seq.num_cached_tokens,
                seq.error,
                None if seq.prompt_logprobs is None else seq.take_prompt_logprobs(),
                seq.embedding,
            )
            seq.pending_tokens = []
            if stream is None:
                continue
            listener = stream.listener
            if listener is not None and running is stream.loop:
                listener(chunk)  # `push` and `deliver` written out: once per token and step
            else:
                stream.push(chunk, running)

    def _publish_events(self) -> None:
        events = self.block_manager.take_events()
        sink = self._sink
        if events and sink is not None:
            try:
                sink(events)
            except Exception:
                logger.exception("KV event sink failed; events of this step are lost")


class OutputStream:
    """The async iterator `generate()` returns; closing it early (even before the first
    `__anext__`), cancelling a wait on it, or dropping it aborts the request."""

    def __init__(self, engine: StreamingEngine, request_id: str, stream: _Stream) -> None:
        self._engine = engine
        self.request_id = request_id
        self._stream = stream
        self._done = False

    def __aiter__(self) -> OutputStream:
        return self

    def listen(self, callback: Callable[[GenerateOutput], None]) -> None:
        """Deliver every output to `callback` (on the caller's loop) instead of the async
        iterator: no task wake-up per output. Outputs already queued go first, in order.
        The last output has `finish_reason` set; abort with `aclose()` as usual."""
        self.listen_chunks(lambda chunk: callback(chunk.output()))

    def listen_chunks(self, callback: Callable[[Chunk], None]) -> None:
        """`listen`, with each output as the engine's `Chunk` (no model built per output)
        handed straight from the engine to `callback`."""
        stream = self._stream
        queue = stream._queue
        while queue is not None and not queue.empty():
            chunk = queue.get_nowait()
            if chunk.finish_reason is not None:
                self._done = True
            callback(chunk)
        if not self._done:
            stream.listener = callback

    def _open(self) -> bool:
        """Whether the request still runs for this caller: not closed here, and not yet
        finished by the engine (which forgets a stream as it sends its last chunk)."""
        return not self._done and self._engine._streams.get(self.request_id) is self._stream

    async def __anext__(self) -> GenerateOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._stream.queue.get()
        except asyncio.CancelledError:
            self._done = True
            self._engine.abort_nowait(self.request_id)
            raise
        if chunk.finish_reason is not None:
            self._done = True
        return chunk.output()

    async def aclose(self) -> None:
        if self._open():
            self._done = True
            await self._engine.abort(self.request_id)

    def __del__(self) -> None:
        if self._open():
            with contextlib.suppress(Exception):
                self._engine.abort_nowait(self.request_id)

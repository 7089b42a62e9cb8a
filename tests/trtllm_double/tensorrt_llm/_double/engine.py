"""The double's executor: one thread with its own asyncio loop stepping all requests.

Why a thread + loop: results must be consumable from sync code (`result()`), from any event
loop (`async for`), and requests of one LLM must interleave and be abortable mid-stream, like
the real in-flight batching executor. Each iteration admits queued requests (capacity of the
KV pool permitting, GUARANTEED_NO_EVICT style), runs their context phase, then decodes one
token for every running sequence, and sleeps `step_s` (TLLM_DOUBLE_STEP_S) before the next.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import hashing
from .kv_pool import BlockPool, event_json
from .queues import WakeQueue
from .requests import (
    Request,
    Sequence,
    TokenSpace,
    check_transfer,
    draw_token,
    logprob_entry,
    new_sequences,
    opaque_state,
)
from .responses import ContextPhase, Response, SeqUpdate

logger = logging.getLogger("tensorrt_llm")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    vocab_size: int
    end_token_ids: frozenset[int]
    max_seq_len: int
    max_batch_size: int
    tokens_per_block: int
    num_blocks: int
    block_reuse: bool
    event_buffer_max_size: int  # 0: no KV events
    iter_stats: bool
    max_stats_len: int
    cache_transceiver: bool
    step_s: float


class Engine:
    """Owns the requests, the KV pool and the event/stat queues of one LLM."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        events_on = config.event_buffer_max_size > 0 and config.block_reuse
        self.events: WakeQueue[str] | None = (
            WakeQueue(maxlen=config.event_buffer_max_size) if events_on else None
        )
        self.stats: WakeQueue[str] | None = (
            WakeQueue(maxlen=max(config.max_stats_len, 1)) if config.iter_stats else None
        )
        self._event_id = 0
        self._space = TokenSpace.for_vocab(config.vocab_size, set(config.end_token_ids))
        self._pool = BlockPool(
            config.num_blocks,
            config.tokens_per_block,
            reuse=config.block_reuse,
            emit=self._emit_event if events_on else None,
        )
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._by_id: dict[int, Request] = {}
        self._iteration_no = 0
        self._closing = False
        self._closed = False
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name="tllm-double-executor", daemon=True
        )
        self._thread.start()
        self._ready.wait()

    # --- thread-safe API -----------------------------------------------------------------
    def submit(self, request: Request) -> None:
        self._call(self._enqueue, request)

    def abort_request(self, request_id: int) -> None:
        with contextlib.suppress(RuntimeError):  # already shut down: nothing to abort
            self._call(self._mark_cancelled, request_id)

    def is_shutdown(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._call(self._set_closed)
        except RuntimeError:
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("LLM is shutting down")
        loop.call_soon_threadsafe(fn, *args)

    # --- loop ----------------------------------------------------------------------------
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._ready.set()
        while not self._closed:
            if not self._waiting and not self._active:
                await self._wake.wait()
                self._wake.clear()
                continue
            started = time.monotonic()
            try:
                self._iteration(started)
            except Exception as exc:  # a double bug must not hang the consumers
                logger.exception("TensorRT-LLM test double executor failed")
                self._fail_all(f"internal error in the TensorRT-LLM test double: {exc!r}")
            await asyncio.sleep(self.config.step_s)
        self._fail_all("LLM is shutting down")

    def _enqueue(self, request: Request) -> None:
        self._waiting.append(request)
        self._by_id[request.request_id] = request
        assert self._wake is not None
        self._wake.set()

    def _mark_cancelled(self, request_id: int) -> None:
        request = self._by_id.get(request_id)
        if request is not None and not request.done:
            request.cancelled = True

    def _set_closed(self) -> None:
        self._closed = True
        assert self._wake is not None
        self._wake.set()

    def _fail_all(self, message: str) -> None:
        for request in [*self._waiting, *self._active]:
            if not request.done:
                request.done = True
                request.queue.put(Response(error=message))
        self._waiting.clear()
        self._active.clear()
        self._by_id.clear()

    # --- one iteration -------------------------------------------------------------------
    def _iteration(self, started: float) -> None:
        self._iteration_no += 1
        completed = 0
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._finish(request, cancel=True)
            completed += 1
        new: list[Request] = []
        while self._waiting and len(self._active) < self.config.max_batch_size:
            request = self._waiting[0]
            error = self._check(request)
            if error is not None:
                self._waiting.popleft()
                self._drop(request, error)
                continue
            if not self._admit(request):
                break
            self._waiting.popleft()
            self._active.append(request)
            new.append(request)
        scheduled, progressed, stalled = len(self._active), bool(new), []
        for request in list(self._active):
            if request.cancelled:
                self._finish(request, cancel=True)
            elif request in new:
                self._context_step(request)
            elif self._decode_step(request):
                progressed = True
            else:
                stalled.append(request)
            if request.done:
                self._active.remove(request)
                completed += 1
                progressed = True
        if stalled and not progressed:  # no preemption in the double: fail the newest
            self._evict_request(stalled[-1])
            completed += 1
        if self.stats is not None:
            self._push_stats(started, new, scheduled, completed)

    def _drop(self, request: Request, error: str) -> None:
        request.done = True
        self._by_id.pop(request.request_id, None)
        request.queue.put(Response(error=error))

    def _evict_request(self, request: Request) -> None:
        """The KV cache is full and nothing can advance: this request fails, its KV is freed."""
        for seq in request.sequences:
            self._pool.free_private(seq.private)
            seq.private = 0
        self._pool.release(request.chain)
        request.chain = []
        self._active.remove(request)
        self._drop(
            request,
            f"The KV cache is full ({self.config.num_blocks} blocks of "
            f"{self.config.tokens_per_block} tokens) and no running request can advance",
        )

    def _check(self, request: Request) -> str | None:
        """Executor-side validation: reported as RequestError when the result is iterated."""
        cfg, prompt = self.config, request.prompt
        if not prompt:
            return "The prompt is empty: prompt_token_ids must hold at least one token"
        if request.kind == "generation_only" and cfg.cache_transceiver:
            error = check_transfer(request, cfg.tokens_per_block)  # also brings the images' digest
            if error is not None:
                return error
        bad = next(
            (t for t in prompt if not 0 <= t < cfg.vocab_size and t != request.mm_placeholder),
            None,
        )
        if bad is not None:
            return (
                f"Token ID {bad} in the prompt is out of the vocabulary range [0, {cfg.vocab_size})"
            )
        if len(prompt) >= cfg.max_seq_len:
            return (
                f"The prompt length ({len(prompt)}) must be smaller than max_seq_len "
                f"({cfg.max_seq_len})"
            )
        if request.kind != "aggregated" and not cfg.cache_transceiver:
            return (
                f"disaggregated_params.request_type={request.kind!r} needs a KV cache "
                "transceiver: construct the LLM with cache_transceiver_config"
            )
        request.max_new = (
            1
            if request.kind == "context_only"
            else min(request.params.max_tokens, cfg.max_seq_len - len(prompt))
        )
        need = self._prompt_blocks(request, matched=0)
        if need > cfg.num_blocks:
            return (
                f"The prompt needs {need} KV cache blocks but the cache holds only "
                f"{cfg.num_blocks} (tokens_per_block={cfg.tokens_per_block})"
            )
        return None

    def _prompt_blocks(self, request: Request, matched: int) -> int:
        """Private blocks the context phase takes: the unmatched prompt, per sequence."""
        count = request.params.best_of or 1
        return count * self._pool.blocks_for(len(request.prompt) - matched)

    def _admit(self, request: Request) -> bool:
        """Start a request when its prompt's KV fits (later blocks are taken as it grows)."""
        pool = self._pool
        match = pool.match(request.prompt, request.salt_id)
        matched_evictable = sum(1 for h in match.hashes if pool.is_evictable(h))
        if (
            self._prompt_blocks(request, match.tokens)
            > pool.free + pool.evictable - matched_evictable
        ):
            return False
        pool.acquire(match.hashes)
        request.chain = list(match.hashes)
        if request.kind != "generation_only":
            request.cached_tokens = match.tokens
        reused = len(match.hashes)
        pool.count_lookup(reused, pool.blocks_for(len(request.prompt)) - reused)
        state = hashing.absorb(hashing.initial_state(), request.prompt)
        if request.mm_digest is not None:  # the "vision tower": the images steer the tokens
            state = hashing.absorb(state, (request.mm_digest,))
        request.sequences = new_sequences(request, state)
        for seq in request.sequences:
            seq.kv_len = len(request.prompt)
            self._fit_private(request, seq)
        return True

    # --- steps ---------------------------------------------------------------------------
    def _fit_private(self, request: Request, seq: Sequence) -> bool:
        """Hold exactly the private blocks seq's KV needs beyond the stored chain."""
        committed = len(request.chain) * self._pool.tokens_per_block
        target = self._pool.blocks_for(max(seq.kv_len - committed, 0))
        if target > seq.private:
            if not self._pool.can_allocate(target - seq.private):
                return False
            self._pool.allocate(target - seq.private)
        elif target < seq.private:
            self._pool.free_private(seq.private - target)
        seq.private = target
        return True

    def _context_step(self, request: Request) -> None:
        pool, prompt = self._pool, request.prompt
        request.started = True
        if self.config.block_reuse:
            hashes = pool.chain(prompt, None, request.salt_id)[len(request.chain) :]
            if hashes:
                start = len(request.chain) * pool.tokens_per_block
                parent = request.chain[-1] if request.chain else None
                pool.store(
                    prompt[start:], parent, hashes, private_blocks=len(hashes), keep_refs=True
                )
                request.sequences[0].private -= len(hashes)
                request.chain.extend(hashes)
        for seq in request.sequences:
            self._fit_private(request, seq)  # other sequences drop their copies of full blocks
            if request.kind == "generation_only":
                assert request.disagg is not None and request.disagg.first_gen_tokens
                token = request.disagg.first_gen_tokens[0]
                word = hashing.draw(seq.state, seq.salt)
                entry = (
                    logprob_entry(request, seq, self._space, word, token)
                    if request.want_logprobs
                    else None
                )
            else:
                token, entry = draw_token(request, seq, self._space)
            request.first_tokens.append(token)
            self._append(request, seq, token, entry)
            if request.kind == "context_only" and seq.finish in (None, "length"):
                seq.finish = "not_finished"  # generation continues on another engine
        self._after_step(request)

    def _decode_step(self, request: Request) -> bool:
        """One token per running sequence; False when none could get a KV block."""
        progressed = False
        for seq in request.sequences:
            if seq.finish is not None:
                continue
            seq.kv_len += 1
            if not self._fit_private(request, seq):
                seq.kv_len -= 1  # paused until blocks free up
                continue
            token, entry = draw_token(request, seq, self._space)
            self._append(request, seq, token, entry)
            progressed = True
        if progressed:
            self._after_step(request)
        return progressed

    def _after_step(self, request: Request) -> None:
        if all(seq.finish is not None for seq in request.sequences):
            self._finish(request)
        elif request.streaming:
            self._send(request, final=False)

    def _append(self, request: Request, seq: Sequence, token: int, entry: Any) -> None:
        seq.generated.append(token)
        seq.state = hashing.absorb(seq.state, (token,))
        if entry is not None:
            seq.logprobs.append(entry)
            seq.cumulative_logprob += next(lp for tok, lp, _ in entry if tok == token)
        if request.end_id >= 0 and token == request.end_id:
            seq.finish = "end_id"  # the end token is not returned (like the C++ executor)
            seq.generated.pop()
            if entry is not None:
                seq.logprobs.pop()
        elif any(w and seq.generated[-len(w) :] == w for w in request.stop_words):
            seq.finish = "stop_words"
        elif len(seq.generated) >= request.max_new:
            seq.finish = "length"

    def _finish(self, request: Request, cancel: bool = False) -> None:
        """Release (and, with block reuse, store) the request's KV; send the final response."""
        pool, tpb = self._pool, self._pool.tokens_per_block
        for seq in request.sequences:
            if cancel and seq.finish is None:
                seq.finish = "cancelled"
            if self.config.block_reuse and request.started:
                tokens = (request.prompt + seq.generated)[: seq.kv_len]
                committed = len(request.chain) * tpb
                parent = request.chain[-1] if request.chain else None
                hashes = pool.chain(tokens[committed:], parent, request.salt_id)
                pool.store(
                    tokens[committed:], parent, hashes, private_blocks=seq.private, keep_refs=False
                )
            else:
                pool.free_private(seq.private)
            seq.private = 0
        pool.release(request.chain)
        request.chain, request.done = [], True
        self._by_id.pop(request.request_id, None)
        if not request.started:  # cancelled before its context phase ran
            count = request.params.best_of or 1
            updates = [SeqUpdate(i, [], finish="cancelled") for i in range(count)]
            request.queue.put(Response(updates, is_final=True))
            return
        phase = None
        if request.kind == "context_only" and not cancel:
            assert request.disagg is not None
            phase = ContextPhase(
                first_gen_tokens=list(request.first_tokens),
                req_id=request.disagg.disagg_request_id or request.request_id,
                opaque_state=opaque_state(request, tpb, list(request.first_tokens)),
            )
        self._send(request, final=True, phase=phase)

    def _send(self, request: Request, final: bool, phase: ContextPhase | None = None) -> None:
        updates, want = [], request.want_logprobs
        for seq in request.sequences:
            new = seq.generated[seq.sent_tokens :]
            if not seq.prompt_sent and not request.params.exclude_input_from_output:
                new = request.prompt + new
            seq.prompt_sent = True
            finish = seq.finish if seq.finish is not None and not seq.finish_sent else None
            if not new and finish is None:
                continue
            logprobs = seq.logprobs[seq.sent_logprobs :] if want else None
            seq.sent_tokens, seq.sent_logprobs = len(seq.generated), len(seq.logprobs)
            seq.finish_sent = seq.finish_sent or finish is not None
            cumulative = seq.cumulative_logprob if want else None
            updates.append(SeqUpdate(seq.index, new, logprobs, cumulative, finish))
        request.queue.put(Response(updates, final, request.cached_tokens, phase))

    # --- events and stats ----------------------------------------------------------------
    def _emit_event(self, data: dict) -> None:
        assert self.events is not None
        self.events.put(event_json(self._event_id, data, self.config.max_seq_len))
        self._event_id += 1

    def _push_stats(
        self, started: float, new: list[Request], scheduled: int, completed: int
    ) -> None:
        assert self.stats is not None
        ctx_tokens = sum(len(r.prompt) - r.cached_tokens for r in new)
        stat = {
            "iter": self._iteration_no,
            "iterLatencyMS": (time.monotonic() - started) * 1000.0,
            "timestamp": time.strftime("%m-%d-%Y %H:%M:%S"),
            "numActiveRequests": scheduled,
            "numQueuedRequests": len(self._waiting),
            "numNewActiveRequests": len(new),
            "numCompletedRequests": completed,
            "maxNumActiveRequests": self.config.max_batch_size,
            "gpuMemUsage": 0,
            "cpuMemUsage": 0,
            "pinnedMemUsage": 0,
            "kvCacheStats": self._pool.stats(),
            "inflightBatchingStats": {
                "numScheduledRequests": scheduled,
                "numContextRequests": len(new),
                "numGenRequests": scheduled - len(new),
                "numPausedRequests": 0,
                "numCtxTokens": ctx_tokens,
                "microBatchId": 0,
                "avgNumDecodedTokensPerIter": 1.0,
            },
        }
        self.stats.put(json.dumps(stat))

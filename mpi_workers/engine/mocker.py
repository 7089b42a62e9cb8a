"""`MockerEngine`: a simulated engine for router and load tests at scale without accelerators.

It runs the REAL `BlockManager` and `Scheduler` (so prefix hits, preemption and KV events are
exactly the built-in engine's) and replaces the forward pass with a timing model:

- prefill: `prefill_ms_per_token` × tokens computed (cached prefix tokens are free);
- decode: `decode_ms_base + decode_ms_per_seq × batch + decode_ms_per_ctx_token × context`;

a step that mixes both costs the sum; every time is divided by `speedup`. Stepping runs on
the event loop as timer callbacks (a step is a timer plus cheap bookkeeping; no task, no
future per step: at real-time pace a step's wake-up is most of a worker's CPU), so many
mockers share one process or one machine. Steps shorter than the event loop's timer
resolution (a large `speedup`) run back to back between yields (`_advance`), and the tokens
they made reach the caller as one chunk per request: a sped-up mocker streams in chunks of
several tokens.

Tokens are deterministic pseudo-random ids (a hash of the prompt, the position and, for
sampling at temperature > 0, the seed if one is given and the choice's index if it is not
choice 0) that avoid EOS and the stop ids, so a request always runs to `max_tokens`. Unseeded
requests with the same prompt get the same tokens (the benchmarks compare policies on the same
texts); a request's `n` choices at temperature > 0 differ from each other, as sampled ones do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.config import ENGINE_DEFAULTS, MockerConfig
from contract.messages import GenerateOutput, GenerateRequest, PoolingParams, encode_embedding
from mpi_workers.engine.block_manager import BlockManager
from mpi_workers.engine.model_shape import ModelShape
from mpi_workers.engine.scheduler import ScheduledBatch, Scheduler
from mpi_workers.engine.sequence import SeqStatus, Sequence
from mpi_workers.engine.streaming import RequestValidationError, StreamingEngine

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_MIN_SLEEP_S = 0.002  # shorter step times are summed before sleeping (MockerEngine._advance)
_YIELD_EVERY_S = 0.0005  # short steps run back to back for this long between yields


@dataclass
class MockerStats:
    num_cached_prompt_tokens: int = 0  # prompt tokens of finished requests served from cache


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread deterministic hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class MockerEngine(StreamingEngine):
    """Real block manager and scheduler, simulated time, pseudo tokens."""

    kind = "mocker"
    simulated = True
    # Simulated tokens have no distribution to report or bias (neither the sampled ones nor
    # the prompt's), nor a grammar to follow (guided). (min_tokens needs nothing: pseudo
    # tokens are never EOS or a stop id, so an output only ends at max_tokens.)
    unsupported_params = frozenset({"logprobs", "logit_bias", "prompt_logprobs", "guided"})
    # Embeddings are simulated too (`simulated_embedding`: a pseudo-random unit vector of the
    # model's hidden size, the same for the same prompt), after the prompt's simulated
    # prefill time: load tests drive /v1/embeddings at scale; the response says simulated.
    tasks = frozenset({"generate", "embed"})

    def __init__(
        self,
        timing: MockerConfig | None = None,
        *,
        model_name: str = "mocker",
        shape: ModelShape | None = None,
        block_size: int = ENGINE_DEFAULTS.block_size,
        num_blocks: int | None = None,
        max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs,
        max_num_batched_tokens: int = 2048,  # not the config's 1024: the tests rest on it
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.timing = timing or MockerConfig()
        shape = shape or ModelShape()
        self.model_name = model_name
        self.block_size = block_size
        self.vocab_size = shape.vocab_size
        self._banned_base = frozenset(shape.eos_token_ids)
        self.hidden_size = shape.hidden_size
        num_blocks = num_blocks or self.timing.num_blocks
        # every accepted request must be able to finish alone, as in the torch engine
        self.max_model_len = min(
            max_model_len or shape.max_position_embeddings, num_blocks * block_size
        )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max(max_num_batched_tokens, 1))
        self.stats = MockerStats()
        self._init_streaming()
        self._seeds: dict[str, int] = {}
        self._debt_s = 0.0  # simulated step time not yet slept (see _advance)
        self._yielded_at = 0.0  # perf_counter of the last yield to the event loop
        self._undelivered: dict[str, Sequence] = {}  # tokens made since the last yield
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._next: asyncio.Handle | None = None  # the pending call of the stepping; None: idle

    # ----- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    async def shutdown(self) -> None:
        if self._loop is None:
            return
        if self._next is not None:
            self._next.cancel()
            self._next = None
        self._loop = None
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "abort")

    # ----- requests ------------------------------------------------------------------------
    def generate(
        self, request: GenerateRequest, media: Any = None
    ) -> AsyncIterator[GenerateOutput]:
        del media  # the mocker takes no images (`media_kinds` is empty)
        self.validate(request)
        loop = self._loop
        if loop is None:
            raise RuntimeError("engine not started: await engine.start() first")
        max_len = min(len(request.token_ids) + request.sampling.max_tokens, self.max_model_len)
        if request.pooling is not None:  # an embedding: the prompt alone
            max_len = len(request.token_ids)
        seq = Sequence(
            request_id=request.request_id,
            token_ids=list(request.token_ids),
            sampling=request.sampling,
            max_len=max_len,
            pooling=request.pooling,
        )
        self._seeds[request.request_id] = self.token_seed(request)
        stream = self._open_stream(request.request_id)
        self.scheduler.add(seq)
        if self._next is None:  # idle: step from the next loop turn on
            self._debt_s = 0.0  # idle time is no step's
            self._next = loop.call_soon(self._advance)
        return stream

    def validate(self, request: GenerateRequest) -> None:
        super().validate(request)
        dimensions = request.pooling.dimensions if request.pooling is not None else None
        if dimensions is not None and dimensions > self.hidden_size:
            raise RequestValidationError(
                "pooling", f"dimensions {dimensions} is more than the model's hidden size "
                f"{self.hidden_size}",
            )  # fmt: skip

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Aborts are synchronous here: the stepping task runs on this event loop."""
        seq = self.scheduler.find(request_id)
        if seq is not None:
            self._finish(seq, "abort")
            self._publish_events()

    # ----- timing model --------------------------------------------------------------------
    def step_time_s(self, batch: ScheduledBatch) -> float:
        """Seconds one step takes in simulation (already divided by `speedup`)."""
        t = self.timing
        prefill_tokens = 0
        decode_seqs = 0
        context = 0
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            if n == 1 and seq.num_computed >= seq.num_prompt_tokens:
                decode_seqs += 1
                context += len(seq.token_ids)
            else:
                prefill_tokens += n
        ms = t.prefill_ms_per_token * prefill_tokens
        if decode_seqs:
            ms += (
                t.decode_ms_base
                + t.decode_ms_per_seq * decode_seqs
                + t.decode_ms_per_ctx_token * context
            )
        return ms / 1000.0 / t.speedup

    @staticmethod
    def token_seed(request: GenerateRequest) -> int:
        """What `request`'s pseudo tokens hash besides their positions: its prompt and, when
        it samples (temperature > 0), its seed if given and its choice index past choice 0
        (so that choice 0 and every single-choice request keep the tokens they always had)."""
        digest = hashlib.blake2b(repr(request.token_ids).encode(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little")
        sampling = request.sampling
        if sampling.temperature > 0:
            if sampling.seed is not None:
                seed = _mix64(seed ^ (sampling.seed & _MASK64))
            if request.choice_index:  # a round of its own: choice i is not seed i's sample
                seed = _mix64(_mix64(seed) ^ request.choice_index)
        return seed

    def _allowed(self, seq: Sequence, token: int) -> int:
        """`token` if it is neither EOS nor one of `seq`'s stop ids, else the next id that is
        neither (the rare case of `_apply`'s draw)."""
        banned = self._banned_base.union(seq.sampling.stop_token_ids)
        while token in banned and len(banned) < self.vocab_size:
            token = (token + 1) % self.vocab_size
        return token

    # ----- stepping ------------------------------------------------------------------------
    def _advance(self) -> None:
        """Run steps until one must wait: schedule a step, take its simulated time
        (`step_time_s`) and apply it. The event loop wakes at best every ~1 ms (epoll's
        resolution), so sleeping each microsecond step of a sped-up model would make every
        step last a millisecond: short steps add up to a debt slept off (by the clock) once
        it is worth a timer; meanwhile they run back to back, yielding to the loop (new
        requests, aborts, the outputs' publisher) every `_YIELD_EVERY_S`: the tokens of those
        steps go out as one chunk per request (as a fast engine's do when its reader lags),
        and no step pays a loop turn or a message. Idle (no work), it stops; `generate`
        starts it again."""
        loop = self._loop
        self._next = None
        if loop is None:  # shut down
            return
        while True:
            if not self.scheduler.has_work():
                self._flush()
                return
            batch = self.scheduler.schedule()
            if not batch:  # nothing fits right now; wait for a finish or an abort
                self._flush()
                self._next = loop.call_later(0.001, self._advance)
                return
            self._debt_s += self.step_time_s(batch)
            if self._debt_s >= _MIN_SLEEP_S:
                self._flush()
                self._next = loop.call_later(self._debt_s, self._woke, batch, loop.time())
                return
            if time.perf_counter() - self._yielded_at >= _YIELD_EVERY_S:
                self._flush()
                self._next = loop.call_soon(self._woke, batch, None)
                return
            self._apply_step(batch)

    def _woke(self, batch: ScheduledBatch, slept_from: float | None) -> None:
        """The end of `batch`'s step (a timer's, or a yield's: `slept_from` None): apply it,
        then go on stepping."""
        self._yielded_at = time.perf_counter()
        if slept_from is not None and self._loop is not None:
            # overslept: the next steps run that much sooner (bounded: a stall is not repaid)
            slept = self._loop.time() - slept_from
            self._debt_s = max(self._debt_s - slept, -_MIN_SLEEP_S)
        self._apply_step(batch)
        self._advance()

    def _apply_step(self, batch: ScheduledBatch) -> None:
        try:
            self._apply(batch)
        except Exception:  # a bookkeeping bug must not hang every caller
            logger.exception("mocker step failed; failing its requests")
            for seq in batch.seqs:
                if seq.status is not SeqStatus.FINISHED:
                    self._finish(seq, "error")

    def _flush(self) -> None:
        """Before the stepping yields: the tokens of the steps since the last yield, one
        chunk per request (a finishing request's went out with its finish), and the steps'
        KV events, one batch."""
        if self._undelivered:
            finished = SeqStatus.FINISHED
            self._deliver_all(
                seq
                for seq in self._undelivered.values()
                if seq.pending_tokens and seq.status is not finished
            )
            self._undelivered.clear()
        self._publish_events()

    def _apply(self, batch: ScheduledBatch) -> None:
        """The step's bookkeeping: new tokens, full blocks hashed (KV events), finishes.
        At real-time pace this runs once per ~5 ms step for every running request, so it
        reads plain attributes and calls the block manager only when a block filled."""
        bm = self.block_manager
        block_size = bm.block_size
        undelivered = self._undelivered
        seeds, vocab_size, banned = self._seeds, self.vocab_size, self._banned_base
        running = SeqStatus.RUNNING
        finished: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            if seq.status is not running:  # aborted or preempted while we slept
                continue
            computed = seq.num_computed + n
            seq.num_computed = computed
            tokens = seq.token_ids
            if computed >= len(tokens) and seq.pooling is not None:
                seq.embedding = simulated_embedding(
                    seeds.get(seq.request_id, 0), self.hidden_size, seq.pooling
                )
                seq.finish_reason = "stop"
            elif computed >= len(tokens):
                # the pseudo token for this position (never EOS or a stop id)
                token = _mix64(seeds.get(seq.request_id, 0) ^ len(tokens)) % vocab_size
                if token in banned or token in seq.sampling.stop_token_ids:
                    token = self._allowed(seq, token)
                tokens.append(token)
                seq.pending_tokens.append(token)
                if len(tokens) >= seq.max_len:
                    seq.finish_reason = "length"
            if computed >= (len(seq.block_hashes) + 1) * block_size:
                bm.commit(seq)  # a block became full: hash and publish it
            if seq.finish_reason is not None:
                finished.append(seq)
            elif seq.pending_tokens:
                undelivered[seq.request_id] = seq  # delivered at the next yield
        for seq in finished:  # after every commit of the step, as before any finish
            self._finish(seq, seq.finish_reason)  # type: ignore[arg-type]

    def _on_finish(self, seq: Sequence, reason: str) -> None:
        if seq.admitted_once and seq.status is not SeqStatus.FINISHED:
            self.stats.num_cached_prompt_tokens += seq.num_cached_tokens
        self._seeds.pop(seq.request_id, None)


def simulated_embedding(seed: int, hidden_size: int, pooling: PoolingParams) -> str:
    """A pseudo-random vector for a prompt (`seed`: its `token_seed`), as the wire carries
    embeddings: standard normal components, cut to `pooling.dimensions`, unit length if
    `pooling.normalize`. The same prompt gets the same vector; it means nothing else."""
    values = np.random.default_rng(seed).standard_normal(hidden_size, dtype=np.float32)
    if pooling.dimensions is not None:
        values = values[: pooling.dimensions]
    if pooling.normalize:
        values = values / np.linalg.norm(values)
    return encode_embedding(values.astype("<f4", copy=False).tobytes())

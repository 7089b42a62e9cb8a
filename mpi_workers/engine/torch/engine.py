"""`TorchEngine`: the built-in engine — asyncio front, one stepping thread behind it.

Callers (asyncio) validate and hand requests to the stepping thread through a thread-safe
queue; the thread runs schedule -> forward -> sample -> bookkeeping in a loop (torch releases
the GIL during the math) and pushes each request's new tokens back into that caller's
asyncio.Queue with `loop.call_soon_threadsafe`. A failing step fails only the requests in
it (finish_reason "error"); the loop keeps serving.

Length policy: a prompt must be shorter than `max_model_len` (else ValueError on
`token_ids`); `max_tokens` beyond the room left is clamped and the request ends with
finish_reason "length" at `max_model_len`. `max_model_len` itself is capped at what the KV
pool can hold, so every accepted request can always finish, alone if need be.

Vision-language models (LLaVA family: `vision.py`): `prepare_media` (a worker thread)
decodes and preprocesses each image with the model folder's own transformers image
processor, or checks a precomputed embedding; the sequence carries them (`SeqMedia`). The
stepping thread runs the vision encoder for an image when the first chunk touching it is
scheduled and keeps the features for the sequence's life; each chunk takes the feature rows
of the image positions inside it (`model_runner.build_plan`).

Prompt logprobs (`SamplingParams.prompt_logprobs`, for `echo` + `logprobs`): such a request
reads no prefix cache (its full blocks are still published); each prefill chunk's plan names
its rows, the runner reduces their logits slice by slice to the next prompt token's logprob
and the top k (`ModelRunner.execute`), and the sequence gathers them chunk by chunk; its first
chunk out carries them. Those steps run synchronously (not overlapped).

Embeddings (`GenerateRequest.pooling`, model.task embed): the prompt runs through the
scheduler like any prefill (so embeddings batch with each other and with generation, chunked,
preemptible), and nothing is sampled: each chunk's plan names the rows to pool
(`Sequence.pool_positions`), the runner keeps their final-norm hidden states (before the
vocabulary head), and the step folds them into the sequence (`_take_pooled`); the chunk that
completes the prompt finishes the sequence with its vector (cut to `dimensions`, normalized).
Its full blocks stay in the prefix cache as any prompt's do (a LAST embedding of a prompt
seen before computes only what the cache lacks; MEAN reads no cache: it needs every row).
Under TP the residual stream is whole on every rank after each all-reduce, so the leader's
hidden states are complete; followers compute the same rows and keep nothing.

Tensor parallelism: with a `TpRuntime` this engine is the group's leader. Each step's
`StepPlan` is broadcast to the followers (`mpi_workers.engine.torch.follower`) before the forward
(with the step's image feature rows: only the leader holds the vision encoder); a
failing TP step (a dead or stuck rank: collective error, or no progress for the group's
timeout, seen by a watchdog) is fatal: every request ends with an error, the fatal handler
tells the worker to deregister and exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from contract.block_hash import media_block_extras
from contract.config import ENGINE_DEFAULTS, MultimodalConfig
from contract.guided import spec_error
from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    GuidedDecoding,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    encode_embedding,
)
from mpi_workers.engine.block_manager import BlockManager
from mpi_workers.engine.scheduler import ScheduledBatch, Scheduler
from mpi_workers.engine.sequence import SeqMedia, SeqStatus, Sequence
from mpi_workers.engine.streaming import RequestValidationError, StreamingEngine
from mpi_workers.engine.torch.disagg_ops import TorchKvHandoff
from mpi_workers.engine.torch.env_switches import env_flag
from mpi_workers.engine.torch.guided import GuideError, Guides
from mpi_workers.engine.torch.kv_cache import KvCache, blocks_for_budget, gpu_kv_budget
from mpi_workers.engine.torch.loader import default_dtype, load_model
from mpi_workers.engine.torch.media_inputs import MediaInputs
from mpi_workers.engine.torch.model_config import load_model_config
from mpi_workers.engine.torch.model_runner import ModelRunner, StepPlan, build_plan, plan_order
from mpi_workers.engine.torch.sampler import Sampler, SampleRow

if TYPE_CHECKING:
    from mpi_workers.engine.torch.tp import TpRuntime
    from mpi_workers.engine.torch.vision import VisionEncoder

logger = logging.getLogger(__name__)

DEFAULT_KV_MEMORY_BYTES = 512 * 2**20


@dataclass
class EngineStats:
    """Monotonic counters (read them from any thread; they are plain ints)."""

    num_steps: int = 0
    num_overlapped_steps: int = 0  # launched while the step before was still in flight
    num_computed_prompt_tokens: int = 0  # prompt tokens whose KV was computed (not cached)
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_finished: int = 0


def pool_sizes(
    cfg: Any,
    block_size: int,
    dtype: torch.dtype,
    num_blocks: int | None,
    kv_cache_memory_bytes: int | None,
    max_model_len: int | None,
    tp_size: int = 1,
    device: torch.device | None = None,
    gpu_memory_utilization: float = ENGINE_DEFAULTS.gpu_memory_utilization,
) -> tuple[int, int]:
    """(KV blocks per rank, max model length) for a memory budget per rank. With no budget
    given, a GPU's pool is what `gpu_memory_utilization` of its memory leaves after the
    weights (the CPU's: DEFAULT_KV_MEMORY_BYTES)."""
    if num_blocks is None:
        budget = kv_cache_memory_bytes
        if budget is None and device is not None and device.type == "cuda":
            budget = gpu_kv_budget(cfg, dtype, device, gpu_memory_utilization, tp_size)
            logger.info("KV cache: %.1f GiB of GPU memory", budget / 2**30)
        num_blocks = blocks_for_budget(cfg, block_size, dtype, budget or DEFAULT_KV_MEMORY_BYTES,
                                       tp_size)  # fmt: skip
    limit = min(max_model_len or cfg.max_position_embeddings, num_blocks * block_size)
    if max_model_len and limit < max_model_len:
        logger.warning("max_model_len capped to %d tokens: the KV pool holds no more", limit)
    return num_blocks, limit


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens are still on the GPU (overlapped scheduling).
    Each sampled sequence holds a placeholder `-(k + 1)` at `slots[k]` of its token list
    until the step is resolved."""

    seqs: list[Sequence]
    sampled: list[Sequence]
    slots: list[int]
    tokens: torch.Tensor | None  # [sampled] token ids on the device
    host: torch.Tensor | None  # their pinned host copy, valid once `copied` has happened
    copied: torch.cuda.Event | None  # None on the CPU (`host` is `tokens`)


def overlap_default() -> bool:
    """HPCSERVE_OVERLAP_SCHEDULING=0 turns overlapped scheduling off (CUDA, one rank)."""
    return env_flag("HPCSERVE_OVERLAP_SCHEDULING", True)


def sample_rows(seqs: list[Sequence]) -> list[SampleRow]:
    """The sampler's view of each sampled sequence, in the step's row order."""
    return [
        SampleRow(s.sampling, s.token_ids, s.num_prompt_tokens, s.generator, s.guide)
        for s in seqs
    ]


class TorchEngine(StreamingEngine, TorchKvHandoff):
    """Plain-PyTorch Llama-family engine with paged KV, prefix caching, continuous batching."""

    kind = "torch"
    tasks = frozenset({"generate", "embed"})

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        block_size: int = ENGINE_DEFAULTS.block_size,
        num_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = ENGINE_DEFAULTS.gpu_memory_utilization,
        # Not the config's (64, 1024): the tests' and benchmarks' figures rest on these.
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        model_name: str | None = None,
        seed: int | None = None,
        tp: TpRuntime | None = None,
        enforce_eager: bool | None = None,
        overlap: bool | None = None,
        max_image_pixels: int = MultimodalConfig.model_fields["max_image_pixels"].default,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.config = load_model_config(self.model_dir)
        self.block_size = block_size
        self.vocab_size = self.config.vocab_size
        self.eos_token_ids = frozenset(self.config.eos_token_ids)
        self.tp = tp
        tp_size = tp.size if tp else 1
        num_blocks, limit = pool_sizes(
            self.config, block_size, self.dtype, num_blocks, kv_cache_memory_bytes,
            max_model_len, tp_size, self.device, gpu_memory_utilization,
        )  # fmt: skip
        if tp is not None:  # followers size their shard's model and cache exactly like us
            # (max_num_seqs too: it bounds the CUDA-graph batch, and leader and followers
            # must pick the same path for every step or their collectives mismatch)
            tp.broadcast_object({"num_blocks": num_blocks, "max_model_len": limit,
                                 "enforce_eager": enforce_eager,
                                 "max_num_seqs": max_num_seqs,
                                 "max_num_batched_tokens": max_num_batched_tokens})  # fmt: skip
        self.max_model_len = limit
        self.max_num_batched_tokens = max(max_num_batched_tokens, 1)
        self.model = load_model(
            self.model_dir, self.config, limit, self.device, self.dtype,
            tp=tp.group if tp else None,
        )  # fmt: skip
        self.kv_cache = KvCache(
            self.config, num_blocks, block_size, self.dtype, self.device, tp_size
        )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model, self.kv_cache, enforce_eager, max_num_seqs, self.max_num_batched_tokens
        )
        self.guides = Guides(self.model_dir, self.vocab_size, self.eos_token_ids)
        self.sampler = Sampler(
            seed, native_argmax=self.model.path.native_argmax, eos_token_ids=self.eos_token_ids,
            guides=self.guides,
        )  # fmt: skip
        self.media_inputs: MediaInputs | None = None  # a vision-language model's images
        if self.config.vision is not None:
            self.media_inputs = MediaInputs(
                self.model_dir, self.config.vision, self.device, self.dtype, max_image_pixels
            )
            self.media_kinds = MediaInputs.kinds
        self.stats = EngineStats()
        self._init_streaming()
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failed: str | None = None  # why the TP group failed (fatal; None: healthy)
        self._fatal_handler: Callable[[str], None] | None = None
        self._fatal_lock = threading.Lock()
        self._step_started: float | None = None
        self.step_timeout_s = tp_step_timeout_s() if tp else 0.0
        # Overlapped scheduling: on one GPU the host schedules and launches step N+1 while
        # the GPU still runs step N (TP followers would need the tokens: not under TP).
        # `overlap=True` forces it (on the CPU too, where it gains nothing: tests use it).
        if overlap is None:
            overlap = self.device.type == "cuda" and overlap_default()
        self.overlap = overlap and tp is None
        self._inflight: InFlightStep | None = None

    # ----- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="torch-engine", daemon=True)
        self._thread.start()
        if self.tp is not None:
            threading.Thread(target=self._watchdog, name="tp-watchdog", daemon=True).start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._commands.put(("wake", None))
        # A failed TP step may leave the thread blocked in a collective: don't wait for it.
        await asyncio.to_thread(self._thread.join, 5.0 if self.failed else None)
        self._thread = None
        self._inflight = None  # its sequences are aborted just below
        if self.tp is not None and self.failed is None:
            self.tp.broadcast_object(None)  # followers leave their loop
            self.tp.close()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "abort")
        while not self._commands.empty():  # requests that never reached the thread
            kind, arg = self._commands.get_nowait()
            if kind == "add":
                self._finish(arg, "abort")
            elif kind in ("abort", "reset_prefix_cache") and arg[1] is not None:
                arg[1][0].call_soon_threadsafe(_resolve, arg[1][1])
            elif kind == "call":  # disaggregation hook: run it now, the thread is gone
                _run_call(*arg)

    # ----- requests ------------------------------------------------------------------------
    def generate(
        self, request: GenerateRequest, media: list[SeqMedia] | None = None
    ) -> AsyncIterator[GenerateOutput]:
        """Validate now (ValueError before any work), then stream outputs when iterated.
        `media`: `prepare_media`'s result for `request.media`."""
        self.validate(request)
        if self.failed is not None:
            raise RuntimeError(f"engine failed: {self.failed}")
        if self._thread is None:
            raise RuntimeError("engine not started: await engine.start() first")
        if request.media and media is None:
            raise RequestValidationError(
                "messages", "the request's images were not prepared (prepare_media)"
            )
        seq = self.make_sequence(request, media)
        stream = self._open_stream(request.request_id)
        self._commands.put(("add", seq))
        return stream

    def stream_sequence(self, seq: Sequence, *, add: bool = True) -> AsyncIterator[GenerateOutput]:
        """Stream a sequence built by the caller (disaggregated serving: a prefill that holds
        its blocks, or a decode whose KV was imported); `add=False` when the caller places it
        on the stepping thread itself through `call_in_engine_thread`."""
        if self._thread is None:
            raise RuntimeError("engine not started: await engine.start() first")
        stream = self._open_stream(seq.request_id)
        if add:
            self._commands.put(("add", seq))
        return stream

    async def call_in_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the stepping thread between steps and return its result: the block
        manager and scheduler are only touched there (disaggregation reserves, imports and
        frees blocks this way). Runs inline when the thread is not running."""
        if self._thread is None:
            return fn()
        if self.failed is not None:
            raise RuntimeError(f"engine failed: {self.failed}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._commands.put(("call", (fn, (loop, done))))
        return await done

    def run_group_command(self, command: Any, lead: Callable[[], Any]) -> Any:
        """On the stepping thread (inside `call_in_engine_thread`): send `command` to the TP
        followers on the step-plan channel (they run `command.follow(kv_cache, tp)`), then
        run the leader's half `lead()` and return its result. Disaggregation moves KV between
        the leader and the ranks' head shards this way. It is a step like any other: the
        watchdog bounds it, and a failure is fatal to the group (the ranks may now disagree)."""
        if self.tp is None:
            return lead()
        if self.failed is not None:
            raise RuntimeError(f"engine failed: {self.failed}")
        self._step_started = time.monotonic()
        try:
            self.tp.broadcast_object(command)
            return lead()
        except Exception as exc:
            logger.exception("tensor-parallel %s failed", type(command).__name__)
            reason = f"{type(exc).__name__}: {exc}"
            self._fail_group(reason)
            raise RuntimeError(f"tensor-parallel group failed: {reason}") from exc
        finally:
            self._step_started = None

    def make_sequence(
        self, request: GenerateRequest, media: list[SeqMedia] | None = None
    ) -> Sequence:
        """The engine's state of `request`; `media` (from `prepare_media`) is required when
        the request has images, except on a decode worker's reservation, which has its
        images' hashes from `request.media` and gets the media later."""
        if request.media and media is not None and len(media) != len(request.media):
            raise ValueError(f"messages: {len(media)} prepared media for "
                             f"{len(request.media)} images")  # fmt: skip
        p = request.sampling
        generator = None
        if p.seed is not None:
            generator = torch.Generator()
            generator.manual_seed(p.seed)
        max_len = min(len(request.token_ids) + p.max_tokens, self.max_model_len)
        if request.pooling is not None:  # the prompt alone
            max_len = len(request.token_ids)
        return Sequence(
            request_id=request.request_id,
            token_ids=list(request.token_ids),
            sampling=p,
            max_len=max_len,
            generator=generator,
            media=list(media or []),
            pooling=request.pooling,
            block_extras=media_block_extras(
                ((m.offset, m.length, m.content_hash) for m in request.media), self.block_size
            ) if request.media else {},
        )  # fmt: skip

    # ----- images ----------------------------------------------------------------------------
    def validate(self, request: GenerateRequest) -> None:
        """The text checks, the output constraint, then each image's placeholder run
        (ValueError naming "messages")."""
        super().validate(request)
        pooling = request.pooling
        if pooling is not None and (pooling.dimensions or 0) > self.config.hidden_size:
            raise RequestValidationError(
                "pooling", f"dimensions {pooling.dimensions} is more than the model's hidden "
                f"size {self.config.hidden_size}",
            )  # fmt: skip
        if request.sampling.guided is not None:
            self._validate_guided(request.sampling.guided, len(request.token_ids))
        if not request.media:
            return
        if self.media_inputs is None:
            raise RequestValidationError(
                "messages", f"model {self.model_name} is text-only: it takes no images"
            )
        self.media_inputs.validate(request)

    def _validate_guided(self, guided: GuidedDecoding, num_tokens: int) -> None:
        """The constraint's grammar builds (cached: the frontend built it too) and the
        model folder has the tokenizer its matchers need."""
        error = spec_error(guided.kind, guided.spec)
        if error is not None:
            raise RequestValidationError("guided", error)
        if guided.generated >= num_tokens:
            raise RequestValidationError("guided", "generated must be below the prompt's length")
        if not (self.model_dir / "tokenizer.json").is_file():
            raise RequestValidationError(
                "guided", f"model {self.model_name} has no tokenizer.json to constrain with"
            )

    def prepare_media(self, request: GenerateRequest, payloads: list[bytes]) -> list[SeqMedia]:
        """Decode + preprocess each image or check each embedding (a worker thread)."""
        if self.media_inputs is None:
            raise RequestValidationError(
                "messages", f"model {self.model_name} is text-only: it takes no images"
            )
        return self.media_inputs.prepare(request, payloads)

    @property
    def vision(self) -> VisionEncoder | None:
        """The vision encoder (the leader's; None for a text-only model)."""
        return None if self.media_inputs is None else self.media_inputs.encoder

    def _encode_media(self, batch: ScheduledBatch) -> None:
        if self.media_inputs is not None:
            self.media_inputs.encode(batch.seqs, batch.num_tokens)

    async def abort(self, request_id: str) -> None:
        """Stop `request_id`; returns once its blocks are freed (no-op if unknown/finished)."""
        await self._command("abort", request_id)

    async def reset_prefix_cache(self) -> None:
        """Drop every reusable cached block (emits KvRemoved); running requests keep theirs."""
        await self._command("reset_prefix_cache", None)

    def abort_nowait(self, request_id: str) -> None:
        """Ask for an abort without waiting (any thread; used when a stream is dropped)."""
        self._commands.put(("abort", (request_id, None)))

    async def _command(self, kind: str, value: Any) -> None:
        """Hand a command to the stepping thread and wait until it has been applied."""
        if self._thread is None:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._commands.put((kind, (value, (loop, done))))
        await done

    # ----- the stepping thread -------------------------------------------------------------
    def _loop(self) -> None:
        logger.info("engine loop started (%s, %s)", self.device, self.dtype)
        with torch.inference_mode():
            while not self._stop.is_set():
                idle = not self.scheduler.has_work()
                if idle and self._inflight is not None:
                    self._settle_inflight()  # before waiting: deliver what it sampled
                self._drain_commands(block=idle)
                if self._stop.is_set():
                    break
                if self.scheduler.has_work():
                    self._step_guarded()

    def _drain_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = item
            if kind == "add":
                self.scheduler.add(arg)
            elif kind == "abort":
                request_id, waiter = arg
                seq = self.scheduler.find(request_id)
                if seq is not None:
                    self._finish(seq, "abort")
                if waiter is not None:
                    waiter[0].call_soon_threadsafe(_resolve, waiter[1])
            elif kind == "reset_prefix_cache":
                self._settle_inflight()
                self.block_manager.reset_prefix_cache()
                self._publish_events()
                arg[1][0].call_soon_threadsafe(_resolve, arg[1][1])
            elif kind == "call":
                self._settle_inflight()  # disaggregation hooks see every token in place
                _run_call(*arg)
                self._publish_events()
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def set_fatal_handler(self, handler: Callable[[str], None] | None) -> None:
        """`handler(reason)` runs (on an engine thread) once the TP group has failed."""
        self._fatal_handler = handler

    def _fail_group(self, reason: str) -> None:
        """Fatal: end every request with `reason`, stop stepping, tell the worker."""
        with self._fatal_lock:
            if self.failed is not None:
                return
            self.failed = reason
        logger.error("tensor-parallel group failed: %s", reason)
        self._stop.set()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "error", error=f"tensor-parallel group failed: {reason}")
        while not self._commands.empty():
            kind, arg = self._commands.get_nowait()
            if kind == "add":
                self._finish(arg, "error", error=f"tensor-parallel group failed: {reason}")
            elif kind in ("abort", "reset_prefix_cache") and arg[1] is not None:
                arg[1][0].call_soon_threadsafe(_resolve, arg[1][1])
            elif kind == "call":  # a waiting caller (disaggregation) must not hang
                loop, future = arg[1]
                error = RuntimeError(f"tensor-parallel group failed: {reason}")
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, future, None, error)
        if self._fatal_handler is not None:
            self._fatal_handler(reason)

    def _watchdog(self) -> None:
        """A TP step stuck past the group's timeout (a rank stopped, NCCL hung) is fatal."""
        while not self._stop.wait(1.0):
            started = self._step_started
            if started is not None and time.monotonic() - started > self.step_timeout_s:
                self._fail_group(f"no progress for {self.step_timeout_s:.0f} s in a step")
                return

    def _step_guarded(self) -> None:
        batch = ScheduledBatch()
        previous = self._inflight
        try:
            batch = self.scheduler.schedule()
            if batch and self.overlap and self._can_launch(batch):
                self._launch(batch, previous)  # step N+1 queued behind step N on the GPU ...
                if previous is not None:
                    self._resolve(previous)  # ... while the host takes step N's tokens
            else:
                if previous is not None:
                    self._inflight = None
                    self._resolve(previous)
                    batch.seqs, batch.num_tokens = _unfinished(batch)
                if batch:
                    self._step_started = time.monotonic()
                    self.step(batch)
        except Exception as exc:  # one bad step must not kill the loop or hang callers
            self._step_started = None
            if self.tp is not None:  # the ranks may now disagree: the group cannot go on
                logger.exception("tensor-parallel step failed")
                self._fail_group(f"{type(exc).__name__}: {exc}")
                return
            failed = list(batch.seqs)
            for flight in (previous, self._inflight):
                failed += flight.seqs if flight is not None else []
            self._inflight = None
            logger.exception("engine step failed; failing its %d requests", len(failed))
            for seq in failed:
                if seq.status is not SeqStatus.FINISHED:
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        self._step_started = None
        self._publish_events()

    def _can_launch(self, batch: ScheduledBatch) -> bool:
        """Whether `batch` can run before the step in flight is resolved: its sampled rows
        need nothing from the host (`Sampler.on_device`), no disaggregated prefill holds
        its blocks for a transfer, no prompt rows want their logprobs, and no embedding
        pools rows."""
        return all(
            not seq.hold_blocks
            and seq.pooling is None  # `step` takes its pooled rows
            and (seq.prompt_logprobs is None  # prompt rows: `step` takes their logprobs
                 or not seq.prompt_logprob_positions(seq.num_computed, n))
            and (
                seq.num_computed + n < seq.num_tokens  # not sampled in this step
                or self.sampler.on_device(seq.sampling, seq.generator)
            )
            for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)
        )

    def _launch(self, batch: ScheduledBatch, previous: InFlightStep | None) -> None:
        """Queue the forward and sampling of `batch` on the GPU and return at once: its
        input ids that are still placeholders take the previous step's tokens on the GPU,
        and its own sampled tokens go to pinned memory asynchronously."""
        self.stats.num_steps += 1
        self.stats.num_overlapped_steps += previous is not None
        self._encode_media(batch)
        plan, sampled = build_plan(batch)
        logits = self.runner.execute(plan, previous.tokens if previous is not None else None)
        self._advance(batch)
        tokens = host = copied = None
        slots: list[int] = []
        if sampled:
            assert logits is not None
            tokens = host = self.sampler.choose(logits.float(), sample_rows(sampled))
            if tokens.device.type == "cuda":
                host = torch.empty(len(sampled), dtype=torch.long, pin_memory=True)
                host.copy_(tokens, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            for k, seq in enumerate(sampled):
                seq.token_ids.append(-(k + 1))
                slots.append(len(seq.token_ids) - 1)
        self._inflight = InFlightStep(list(batch.seqs), sampled, slots, tokens, host, copied)

    def _resolve(self, flight: InFlightStep) -> None:
        """Wait for `flight`'s tokens, put them in place of its placeholders, then commit,
        deliver and finish as a synchronous step does. A sequence that finishes here was
        already launched in the next step: that step's token for it is dropped."""
        if flight.copied is not None:
            flight.copied.synchronize()
        tokens = flight.host.tolist() if flight.host is not None else []
        for seq, slot, token in zip(flight.sampled, flight.slots, tokens, strict=True):
            if seq.status is not SeqStatus.FINISHED:
                self._append_token(seq, token, None, slot)
        self._settle(flight.seqs)

    def _settle_inflight(self) -> None:
        """Resolve the step in flight, if any (before anything reads tokens or blocks)."""
        flight, self._inflight = self._inflight, None
        if flight is not None:
            self._resolve(flight)

    def step(self, batch: ScheduledBatch) -> None:
        """Forward one scheduled batch, sample, update sequences, deliver outputs."""
        self.stats.num_steps += 1
        self._encode_media(batch)
        plan, sampled = build_plan(batch)
        if self.tp is not None:  # followers run the same plan on their shards
            self.tp.broadcast_object(_for_followers(plan))
        logits = self.runner.execute(plan)
        if plan.prompt_rows:
            self._take_prompt_logprobs(batch)
        if plan.pool_rows:
            self._take_pooled(batch)
        self._advance(batch)
        if sampled:
            self._make_guides(sampled)
            tokens, logprobs = self.sampler(logits, sample_rows(sampled))
            for seq, token, lp in zip(sampled, tokens, logprobs, strict=True):
                if seq.status is not SeqStatus.FINISHED:  # (a matcher that failed to build)
                    self._append_token(seq, token, lp)
        self._settle(batch.seqs)

    def _make_guides(self, sampled: list[Sequence]) -> None:
        """A matcher for each constrained sequence sampled for the first time, fed the
        output it already holds (its own tokens; a migrated request's last prompt tokens).
        A sequence whose matcher cannot be made ends with an error, alone."""
        for seq in sampled:
            guided = seq.sampling.guided
            if guided is not None and seq.guide is None:
                output = seq.token_ids[seq.num_prompt_tokens - guided.generated :]
                try:
                    seq.guide = self.guides.matcher(guided, output)
                except GuideError as exc:
                    self._finish(seq, "error", error=f"guided: {exc}")

    def _take_prompt_logprobs(self, batch: ScheduledBatch) -> None:
        """Hand the step's prompt logprobs to their sequences (before `_advance`: the rows
        are those of each sequence's `prompt_logprob_positions` in `build_plan`'s order)."""
        found = self.runner.prompt_logprobs
        assert found is not None, "the leader gets the logits of every prompt row"
        chosen = found.chosen.tolist()
        top_values, top_ids = found.top_values.tolist(), found.top_ids.tolist()
        row = 0
        for index in plan_order(batch):
            seq, n = batch.seqs[index], batch.num_tokens[index]
            positions = seq.prompt_logprob_positions(seq.num_computed, n)
            if not positions:
                continue
            k = seq.sampling.prompt_logprobs or 0
            assert seq.prompt_logprobs is not None
            for position in positions:
                pairs = zip(top_ids[row][:k], top_values[row][:k], strict=True)
                seq.prompt_logprobs.append(TokenLogprob(
                    token_id=seq.token_ids[position + 1], logprob=chosen[row],
                    top=[TopLogprob(token_id=t, logprob=v) for t, v in pairs],
                ))  # fmt: skip
                row += 1

    def _take_pooled(self, batch: ScheduledBatch) -> None:
        """Fold the step's pooled rows into their sequences (before `_advance`: the rows are
        each embedding's `pool_positions` in `build_plan`'s order); a sequence whose prompt
        this step completes ends with its vector (the step's vectors reach the host in one
        copy)."""
        pooled = self.runner.pooled
        assert pooled is not None, "the leader keeps the hidden states of every pool row"
        done: list[tuple[Sequence, torch.Tensor]] = []
        row = 0
        for index in plan_order(batch):
            seq, n = batch.seqs[index], batch.num_tokens[index]
            if seq.pooling is None:
                continue
            positions = seq.pool_positions(seq.num_computed, n)
            rows = pooled[row : row + len(positions)]
            row += len(positions)
            if seq.pooling.pooling_type == "LAST":
                seq.pooled = rows[-1] if len(positions) else seq.pooled
            elif len(positions):
                total = rows.sum(dim=0)
                seq.pooled = total if seq.pooled is None else seq.pooled + total
                seq.pooled_upto = positions.stop
            if seq.num_computed + n == seq.num_tokens:
                done.append((seq, pool_vector(seq)))
                seq.pooled = None
                seq.finish_reason = "stop"
        if not done:
            return
        host = torch.cat([vector for _, vector in done]).to("cpu", torch.float32).numpy()
        start = 0
        for seq, vector in done:
            part = host[start : start + vector.numel()]
            seq.embedding = encode_embedding(part.astype("<f4", copy=False).tobytes())
            start += vector.numel()

    def _advance(self, batch: ScheduledBatch) -> None:
        """Count the batch's tokens as computed."""
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            lo = seq.num_computed
            self.stats.num_computed_prompt_tokens += max(0, min(lo + n, seq.num_prompt_tokens) - lo)
            seq.num_computed = lo + n

    def _settle(self, seqs: list[Sequence]) -> None:
        """After a step's tokens are in place: publish full blocks, then deliver new tokens
        and finish the sequences that ended."""
        live = [seq for seq in seqs if seq.status is not SeqStatus.FINISHED]
        for seq in live:
            self.block_manager.commit(seq)
        self.stats.num_preemptions = self.scheduler.num_preemptions
        self.stats.num_cached_prompt_tokens = self.scheduler.num_cached_prompt_tokens
        for seq in live:
            if seq.finish_reason is not None:
                self._finish(seq, seq.finish_reason, seq.error)
            elif seq.pending_tokens:
                self._deliver(seq)

    def _on_finish(self, seq: Sequence, reason: str) -> None:
        seq.media = []  # the image features go with the sequence
        self.stats.num_finished += 1

    def _append_token(
        self, seq: Sequence, token: int, logprob: Any, slot: int | None = None
    ) -> None:
        """Add a sampled token (or put it at `slot`, in place of its placeholder; a sequence
        that ends there drops the placeholder of the step launched after it)."""
        if slot is None:
            seq.token_ids.append(token)
            slot = len(seq.token_ids) - 1
        else:
            seq.token_ids[slot] = token
        seq.pending_tokens.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        self.stats.num_generated_tokens += 1
        reason = self.finish_reason(seq.sampling, token, slot + 1, seq.max_len)
        if reason != "stop" and seq.guide is not None:  # ("length" too: a disaggregated
            try:  # prefill's one token must reach its matcher; complete at the limit: "stop")
                if self.guides.consume(seq.guide, token):
                    reason = "stop"  # the constrained output is complete
            except GuideError as exc:  # (the mask forbids such tokens: never expected)
                reason, seq.error = "error", f"guided: {exc}"
        if reason is not None:
            seq.finish_reason = reason
            del seq.token_ids[slot + 1 :]

    def finish_reason(
        self, sampling: SamplingParams, token: int, num_tokens: int, max_len: int
    ) -> str | None:
        """Whether a sequence of `num_tokens` ending in `token` stops there, and why (the one
        rule; disaggregated prefill applies it to the first token too)."""
        if (not sampling.ignore_eos and token in self.eos_token_ids) or (
            token in sampling.stop_token_ids
        ):
            return "stop"
        return "length" if num_tokens >= max_len else None

    # ----- convenience for scripts and tests -----------------------------------------------
    async def generate_all(
        self, request: GenerateRequest, media: list[SeqMedia] | None = None
    ) -> GenerateOutput:
        """Run a request to completion; one output with every token (and the finish reason)."""
        tokens: list[int] = []
        logprobs: list[Any] = []
        prompt_logprobs = None
        last = None
        start = time.perf_counter()
        async for out in self.generate(request, media):
            tokens.extend(out.token_ids)
            logprobs.extend(out.logprobs or [])
            if prompt_logprobs is None:
                prompt_logprobs = out.prompt_logprobs
            last = out
        assert last is not None
        logger.debug("%s done in %.3fs", request.request_id, time.perf_counter() - start)
        return last.model_copy(
            update={
                "token_ids": tokens,
                "logprobs": logprobs if last.logprobs is not None else None,
                "prompt_logprobs": prompt_logprobs,
            }
        )


def pool_vector(seq: Sequence) -> torch.Tensor:
    """The embedding of a sequence whose prompt rows are all pooled (on the device): the
    mean (MEAN) or the last row (LAST), cut to `dimensions`, scaled to unit length if asked
    (vLLM's order)."""
    pooling = seq.pooling
    assert pooling is not None and seq.pooled is not None
    vector = seq.pooled
    if pooling.pooling_type == "MEAN":
        vector = vector / seq.num_prompt_tokens
    if pooling.dimensions is not None:
        vector = vector[: pooling.dimensions]
    if pooling.normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return vector


def _for_followers(plan: StepPlan) -> StepPlan:
    """`plan` as broadcast: image feature rows on the CPU (followers load them onto their
    own device)."""
    if plan.embeds is None or plan.embeds.device.type == "cpu":
        return plan
    return dataclasses.replace(plan, embeds=plan.embeds.cpu())


def _unfinished(batch: ScheduledBatch) -> tuple[list[Sequence], list[int]]:
    """The batch without the sequences that finished while it waited (resolving the step
    in flight ended them; their blocks are already freed)."""
    kept = [(seq, n) for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)
            if seq.status is not SeqStatus.FINISHED]  # fmt: skip
    return [seq for seq, _ in kept], [n for _, n in kept]


def tp_step_timeout_s() -> float:
    """How long one TP step may take before the group is declared failed."""
    from mpi_workers.engine.torch.tp import DEFAULT_TIMEOUT_S

    return DEFAULT_TIMEOUT_S + 10.0


def _run_call(fn: Callable[[], Any], waiter: tuple[asyncio.AbstractEventLoop, Any]) -> None:
    """Run a `call_in_engine_thread` function and hand its outcome to the waiting loop."""
    loop, future = waiter
    try:
        result = fn()
    except BaseException as exc:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, None, exc)
        return
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)

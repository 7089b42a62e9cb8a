"""`TrtllmEngine`: our `Engine` over TensorRT-LLM's `LLM` (PyTorch backend).

Requests: our `SamplingParams` are mapped field by field onto TensorRT-LLM's (`detokenize`
off: the frontend detokenizes), `generate_async(streaming=True)` yields cumulative outputs
that become our deltas; a client gone or an abort calls `abort()`; a `RequestError` ends the
stream with an error chunk. KV events (`get_kv_cache_events_async`) are re-hashed into our
block hashes for the KV router; iteration stats (`get_stats_async`) feed the load metrics.

Disaggregation (`NativeKvHandoff`): the prefill worker runs `context_only` (max_tokens 1,
not streamed) and returns the `DisaggregatedParams` as JSON (`opaque_state` base64); the
decode worker runs `generation_only` with them and TensorRT-LLM emits the first token itself.
The KV moves through TensorRT-LLM's cache transceiver (UCX or NIXL, set in the engine YAML).

Images and precomputed embeddings (`multimodal.py`): `prepare_media` decodes them in a worker
thread and collapses each placeholder run to one image token; images go in as
`{"prompt_token_ids", "multi_modal_data"}`, embeddings as `{"prompt", "multi_modal_embeddings"}`
(the ids as text, as Dynamo sends them). A disaggregated request carries them on the prefill
side only: the decode side sends the prompt as the context phase expanded it (passed along in
the prefill blob) and no media.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    GuidedDecoding,
    LoadMetrics,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    choice_seed,
)
from mpi_workers.engine.base import Engine, KvEventSink, NativeKvHandoff
from mpi_workers.engine.model_shape import ModelShape
from mpi_workers.engine.streaming import RequestValidationError, validate_request
from mpi_workers.engine.trtllm.kv_events import KvEventTranslator
from mpi_workers.engine.trtllm.multimodal import (
    TrtllmMedia,
    apply_patch,
    prepare,
    prompt_patch,
    vlm_of,
)

logger = logging.getLogger(__name__)

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "error"}
POLL_TIMEOUT_S = 0.5  # how long one KV-event / stats poll waits for the engine
MIN_POLL_S = 0.05  # a poll that returns sooner (nothing buffered, or turned off) waits this
SILENT_ROUTER_S = 10.0  # finished requests but no KV event for this long: warn (once)
# DisaggregatedParams fields that name GPU-local handles: meaningless on another worker.
LOCAL_HANDLES = (
    "multimodal_embedding_handles",
    "mrope_position_ids_handle",
    "mrope_position_deltas_handle",
)


class TrtllmEngine(Engine, NativeKvHandoff):
    kind = "trtllm"
    # TensorRT-LLM's `prompt_logprobs` are the top k of each context position's logits
    # (`executor/result.py` `compute_logprobs`: no token list is passed for the prompt), so
    # a prompt token outside the top k has no logprob: not the prompt's own logprobs that
    # `echo` + `logprobs` asks for. The frontend refuses such requests (naming `echo`).
    # Constrained output needs the LLM's `guided_decoding_backend` (engine.trtllm config, or
    # the engine YAML): without one the worker's card adds "guided" (`__init__`).
    # guided_thinking: its guided decoding constrains the whole output, so a reasoning
    # model's thinking cannot come first (GuidedDecoding.thinking)
    unsupported_params = frozenset({"prompt_logprobs", "guided_thinking"})

    def __init__(
        self,
        llm_args: dict[str, Any],
        *,
        model_name: str,
        shape: ModelShape,
        block_size: int,
        max_model_len: int,
        kv_events: bool,
    ) -> None:
        from tensorrt_llm import LLM

        # Images only for a VLM whose placeholders our frontend knows how to expand.
        self._vlm = vlm_of(llm_args["model"])
        if self._vlm is not None:
            self.media_kinds = frozenset({"image", "embeds"})
        if not llm_args.get("guided_decoding_backend"):
            self.unsupported_params = TrtllmEngine.unsupported_params | {"guided"}
        self.model_name = model_name
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = shape.vocab_size
        self.kv_events = kv_events
        self.llm = LLM(**llm_args)  # unknown keys: ValueError naming the key
        self._running: dict[str, Any] = {}  # request id -> RequestOutput
        self._aborts: dict[str, asyncio.Event] = {}
        self._sink: KvEventSink | None = None
        self._translator = KvEventTranslator(block_size, shape.vocab_size)
        self._stats: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._events_seen = False
        self._first_finish: float | None = None
        self._warned_silent = False

    # ----- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._poll_stats(), name="trtllm-stats")]
        if self.kv_events:
            self._tasks.append(asyncio.create_task(self._drain_kv_events(), name="trtllm-kv"))

    async def shutdown(self) -> None:
        for request_id in list(self._running):
            await self.abort(request_id)
        # The polls also watch `_stopping`: a library wait that swallows one cancellation
        # (Python 3.11's wait_for can) must not keep them alive, nor hang the shutdown.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2 * POLL_TIMEOUT_S + 1)
        self._tasks = []
        await asyncio.to_thread(self.llm.shutdown)

    # ----- requests ------------------------------------------------------------------------
    def validate(self, request: GenerateRequest) -> None:
        kinds = {ref.kind for ref in request.media} - self.media_kinds
        if kinds:  # first: a text model's vocabulary has no image token either
            raise RequestValidationError(
                "messages", f"this TensorRT-LLM worker takes no {' or '.join(sorted(kinds))}"
            )
        validate_request(request, self.max_model_len, self.vocab_size)
        if request.sampling.prompt_logprobs is not None:  # (callers that skip the frontend)
            raise RequestValidationError(
                "prompt_logprobs", "this TensorRT-LLM worker does not return the prompt's logprobs"
            )
        guided = request.sampling.guided
        if guided is not None and "guided" in self.unsupported_params:
            raise RequestValidationError(
                "guided", "this TensorRT-LLM worker has no guided_decoding_backend"
            )
        if guided is not None and guided.thinking is not None:
            raise RequestValidationError(
                "response_format", "TensorRT-LLM constrains the whole output: a reasoning "
                "model's thinking cannot come before the constrained answer"
            )
        if guided is not None and guided.generated:
            raise RequestValidationError(  # (a migrated continuation: see guided_decoding)
                "guided", "TensorRT-LLM cannot resume a constrained output part-way"
            )
        if request.request_id in self._running:
            raise RequestValidationError("request_id", "a request with this id is running")

    def prepare_media(self, request: GenerateRequest, payloads: list[bytes]) -> TrtllmMedia:
        """RGB PIL images or [rows, hidden] tensors for `request.media` (worker thread)."""
        if self._vlm is None:  # param set: the worker's name table has no "messages"
            raise RequestValidationError("messages", "this TensorRT-LLM worker takes no images")
        return prepare(request, payloads, self._vlm, self.llm.tokenizer)

    def generate(
        self, request: GenerateRequest, media: Any = None
    ) -> AsyncIterator[GenerateOutput]:
        self.validate(request)
        inputs = self._inputs(request, media)
        sampling = self.sampling_params(choice_sampling(request), **_text_fixed(inputs))
        return self._run(request, inputs, sampling, None, None)

    def _inputs(self, request: GenerateRequest, media: Any) -> dict[str, Any]:
        """The prompt as `generate_async` takes it: token ids, plus TensorRT-LLM's multimodal
        dict with each placeholder run collapsed to one image token (see `multimodal.py`)."""
        if not request.media:
            if media is not None:
                raise RequestValidationError("messages", "media given for a text-only request")
            return {"prompt_token_ids": list(request.token_ids)}
        if self._vlm is None or not isinstance(media, TrtllmMedia):
            raise RequestValidationError(
                "messages", "the request's images were not prepared (prepare_media)"
            )
        if len(media.items) != len(request.media):
            raise RequestValidationError(
                "messages", f"{len(request.media)} images but {len(media.items)} prepared"
            )
        return media.inputs()

    async def abort(self, request_id: str) -> None:
        result = self._running.get(request_id)
        if result is None:
            return
        self._aborts[request_id].set()
        result.abort()
        logger.info("request %s aborted in TensorRT-LLM", request_id)

    def sampling_params(self, p: SamplingParams, **fixed: Any) -> Any:
        """Our sampling fields in TensorRT-LLM's names. Greedy is top_k 1 (TensorRT-LLM samples
        greedily when top_k and top_p are unset, and rejects temperature 0 in some versions)."""
        from tensorrt_llm import SamplingParams as TrtSamplingParams

        greedy = p.temperature == 0.0
        kwargs: dict[str, Any] = {
            "max_tokens": p.max_tokens,
            "temperature": None if greedy else p.temperature,
            "top_k": 1 if greedy else (p.top_k if p.top_k > 0 else None),
            "top_p": None if greedy else p.top_p,
            "min_p": p.min_p or None,
            "repetition_penalty": None if p.repetition_penalty == 1.0 else p.repetition_penalty,
            "presence_penalty": p.presence_penalty or None,
            "frequency_penalty": p.frequency_penalty or None,
            "seed": p.seed,
            "stop_token_ids": list(p.stop_token_ids) or None,
            "ignore_eos": p.ignore_eos,
            "logprobs": None if p.logprobs is None else max(p.logprobs, 1),
            "min_tokens": p.min_tokens or None,
            "embedding_bias": self.embedding_bias(p.logit_bias),
            "guided_decoding": guided_decoding(p.guided),
            "detokenize": False,
        }
        kwargs.update(fixed)
        return TrtSamplingParams(**kwargs)

    def embedding_bias(self, logit_bias: dict[int, float]) -> Any:
        """OpenAI's logit_bias as TensorRT-LLM's `SamplingParams.embedding_bias`: a float32
        [vocab_size] tensor added to the logits before sampling (what TensorRT-LLM's own
        OpenAI server makes of it: `serve/openai_protocol.py`); None without a bias."""
        if not logit_bias:
            return None
        import torch

        bias = torch.zeros(self.vocab_size, dtype=torch.float32)
        bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()), dtype=torch.float32)
        return bias

    async def _run(
        self,
        request: GenerateRequest,
        inputs: dict[str, Any],
        sampling: Any,
        disaggregated_params: Any,
        cached_override: int | None,
    ) -> AsyncIterator[GenerateOutput]:
        """Stream `request` through `generate_async`; every chunk holds the new tokens."""
        from tensorrt_llm.executor.utils import RequestError

        rid = request.request_id
        result = self.llm.generate_async(
            inputs,
            sampling_params=sampling,
            streaming=True,
            disaggregated_params=disaggregated_params,
        )
        aborted = asyncio.Event()
        self._running[rid], self._aborts[rid] = result, aborted
        sent = 0
        finished = False
        try:
            async for out in _until(result, aborted):
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                reason = _finish_reason(out, completion)
                cached = getattr(out, "cached_tokens", 0) or 0  # absent before 1.1
                chunk = GenerateOutput(
                    request_id=rid,
                    token_ids=ids[sent:],
                    logprobs=_logprobs(completion, ids, sent, request.sampling.logprobs),
                    finish_reason=reason,  # type: ignore[arg-type]
                    num_prompt_tokens=len(request.token_ids),
                    num_cached_tokens=cached if cached_override is None else cached_override,
                    error="TensorRT-LLM timed out the request" if reason == "error" else None,
                )
                sent = max(sent, len(ids))
                if chunk.token_ids or reason is not None:
                    yield chunk
                if reason is not None:
                    finished = True
                    self._note_finished()
                    return
            finished = True
            yield GenerateOutput(
                request_id=rid, finish_reason="abort" if aborted.is_set() else "error",
                error=None if aborted.is_set() else "TensorRT-LLM ended the stream unfinished",
                num_prompt_tokens=len(request.token_ids),
            )  # fmt: skip
        except RequestError as exc:
            finished = True
            yield GenerateOutput(request_id=rid, finish_reason="error",
                                 error=f"TensorRT-LLM rejected the request: {exc}")  # fmt: skip
        finally:
            if not finished:  # the consumer left (client gone, cancelled): stop the engine
                with contextlib.suppress(Exception):
                    result.abort()
                    logger.info("request %s aborted in TensorRT-LLM (stream closed)", rid)
            self._running.pop(rid, None)
            self._aborts.pop(rid, None)

    # ----- disaggregation ------------------------------------------------------------------
    async def prefill_only(
        self, request: GenerateRequest, media: Any = None
    ) -> tuple[GenerateOutput, dict]:
        """The context phase (with the request's images, if any); the blob carries the
        disaggregated params and, for an image request, the prompt as TensorRT-LLM expanded
        it (`prompt_patch`): the decode side sends that instead of the images."""
        from tensorrt_llm.executor.utils import RequestError
        from tensorrt_llm.llmapi import DisaggregatedParams

        self.validate(request)
        inputs = self._inputs(request, media)
        sampling = self.sampling_params(
            choice_sampling(request), max_tokens=1, **_text_fixed(inputs)
        )
        result = self.llm.generate_async(
            inputs,
            sampling_params=sampling,
            streaming=False,
            disaggregated_params=DisaggregatedParams(request_type="context_only"),
        )
        rid = request.request_id
        aborted = asyncio.Event()
        self._running[rid], self._aborts[rid] = result, aborted
        try:
            out = await result.aresult()
        except RequestError as exc:
            raise RuntimeError(f"TensorRT-LLM rejected the context phase: {exc}") from exc
        except asyncio.CancelledError:
            result.abort()
            raise
        finally:
            self._running.pop(rid, None)
            self._aborts.pop(rid, None)
        if aborted.is_set():
            raise RuntimeError("the context phase was aborted")
        params = out.outputs[0].disaggregated_params or out.disaggregated_params
        if params is None:
            raise RuntimeError(
                "TensorRT-LLM returned no disaggregated_params for a context-only request "
                "(set cache_transceiver_config in the prefill engine YAML)"
            )
        cached = getattr(out, "cached_tokens", 0) or 0
        first = GenerateOutput(
            request_id=rid, num_prompt_tokens=len(request.token_ids), num_cached_tokens=cached
        )
        blob: dict[str, Any] = {
            "disaggregated_params": encode_params(params),
            "num_cached_tokens": cached,
        }
        if request.media:
            blob["multimodal_prompt"] = prompt_patch(request.token_ids, list(out.prompt_token_ids))
        return first, blob

    def generate_from_prefill(
        self, request: GenerateRequest, prefill: dict[str, Any]
    ) -> AsyncIterator[GenerateOutput]:
        """Decode after a remote context phase. An image request needs no images here, only
        the prompt as the context phase expanded it (the KV holds the images)."""
        self.validate(request)
        params = decode_params(prefill["disaggregated_params"])
        cached = int(prefill.get("num_cached_tokens", 0))
        ids = list(request.token_ids)
        if request.media:
            patch = prefill.get("multimodal_prompt")
            if not isinstance(patch, dict):  # not the client's fault: no 4xx
                raise RuntimeError(
                    "the prefill worker sent no expanded prompt for this image request"
                )
            ids = apply_patch(ids, patch)
        inputs = {"prompt_token_ids": ids}
        sampling = self.sampling_params(choice_sampling(request))
        return self._run(request, inputs, sampling, params, cached)

    # ----- observation ---------------------------------------------------------------------
    def load_metrics(self) -> LoadMetrics:
        kv = self._stats.get("kvCacheStats") or {}
        total = int(kv.get("maxNumBlocks", 0))
        used = int(kv.get("usedNumBlocks", 0))
        return LoadMetrics(
            active_sequences=len(self._running),
            waiting_sequences=int(self._stats.get("numQueuedRequests", 0)),
            total_blocks=total,
            free_blocks=int(kv.get("freeNumBlocks", total - used)),
            active_blocks=used,
        )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return self._translator.cached_hashes()

    async def _drain_kv_events(self) -> None:
        """Poll TensorRT-LLM's KV event buffer; publish each event the router can use as it
        arrives (the iterator only ends after `POLL_TIMEOUT_S` without events: waiting for
        its end would hold events back for as long as traffic lasts)."""
        while not self._stopping:
            started = time.monotonic()
            async for raw in self.llm.get_kv_cache_events_async(timeout=POLL_TIMEOUT_S):
                self._events_seen = True
                events = self._translator.translate([_as_dict(raw)])
                if events and self._sink is not None:
                    try:
                        self._sink(events)
                    except Exception:
                        logger.exception("KV event sink failed; these events are lost")
            self._warn_if_silent()
            # an engine with events off answers at once: do not spin
            await asyncio.sleep(max(0.0, MIN_POLL_S - (time.monotonic() - started)))

    async def _poll_stats(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            async for stat in self.llm.get_stats_async(timeout=POLL_TIMEOUT_S):
                self._stats = _as_dict(stat)
            await asyncio.sleep(max(0.0, MIN_POLL_S - (time.monotonic() - started)))

    def _note_finished(self) -> None:
        if self._first_finish is None:
            self._first_finish = time.monotonic()

    def _warn_if_silent(self) -> None:
        """A KV router fed by a worker that sends no events routes blind: say so, once."""
        if self._events_seen or self._warned_silent or self._first_finish is None:
            return
        if time.monotonic() - self._first_finish > SILENT_ROUTER_S:
            self._warned_silent = True
            logger.warning(
                "no KV cache event from TensorRT-LLM %.0f s after the first finished request: "
                "the KV router gets nothing from this worker (check kv_cache_config."
                "enable_block_reuse and event_buffer_max_size in the engine YAML)",
                SILENT_ROUTER_S,
            )


_END = object()


def guided_decoding(guided: GuidedDecoding | None) -> Any:
    """Our output constraint as TensorRT-LLM's `GuidedDecodingParams` (None: none). Its
    grammar backend compiles the schema; a migrated continuation (`guided.generated`) has no
    counterpart there (the matcher cannot be fed the earlier output): `validate` refuses it."""
    if guided is None:
        return None
    from tensorrt_llm.llmapi import GuidedDecodingParams

    if guided.kind == "json_object":
        return GuidedDecodingParams(json_object=True)
    if guided.kind == "json_schema":
        return GuidedDecodingParams(json=guided.spec)
    return GuidedDecodingParams(regex=guided.spec)


def choice_sampling(request: GenerateRequest) -> SamplingParams:
    """`request`'s sampling settings as TensorRT-LLM must get them: an unseeded request samples
    with TensorRT-LLM's fixed default seed, so the `n` choices of one unseeded request at
    temperature > 0 would all be one text; choice i > 0 samples with `choice_seed(0, i)`
    instead (deterministic as TensorRT-LLM's unseeded sampling is, the same on a prefill and
    a decode worker). Seeded choices have their own seeds already (`frontend.choices`)."""
    p = request.sampling
    if p.seed is None and p.temperature > 0 and request.choice_index:
        return p.model_copy(update={"seed": choice_seed(0, request.choice_index)})
    return p


def _text_fixed(inputs: dict[str, Any]) -> dict[str, Any]:
    """A text prompt (embeddings) already holds the template's special tokens."""
    return {"add_special_tokens": False} if "prompt" in inputs else {}


async def _until(result: Any, aborted: asyncio.Event) -> AsyncIterator[Any]:
    """The outputs of `result` until it ends or `aborted` is set (an engine that sends no
    final output after `abort()` must not hang the stream).

    One pump task per request moves outputs into a queue, and one waiter puts the end
    marker there on abort: no task is created per token."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for out in result:
                queue.put_nowait(out)
        except Exception as exc:  # re-raised in the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    async def on_abort() -> None:
        await aborted.wait()
        queue.put_nowait(_END)

    tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(on_abort())]
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:  # also when the consumer closes us mid-wait: leave no task behind
        for task in tasks:
            task.cancel()


def _finish_reason(out: Any, completion: Any) -> str | None:
    reason = completion.finish_reason
    if reason in FINISH_REASONS:
        return FINISH_REASONS[reason]
    return "stop" if out.finished and reason is None else None


def _logprobs(
    completion: Any, ids: list[int], sent: int, wanted: int | None
) -> list[TokenLogprob] | None:
    """Our logprob entries of tokens `sent..`: TensorRT-LLM gives per token either a dict
    {token id: Logprob(logprob, rank)} (the chosen token and the top alternatives) or a float."""
    if wanted is None:
        return None
    entries = list(completion.logprobs or [])
    result: list[TokenLogprob] = []
    for position in range(sent, min(len(ids), len(entries))):
        token, entry = ids[position], entries[position]
        if isinstance(entry, dict):
            chosen = entry.get(token)
            ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)
            logprob = chosen.logprob if chosen is not None else ranked[0][1].logprob
            top = [TopLogprob(token_id=t, logprob=lp.logprob) for t, lp in ranked[:wanted]]
        else:
            logprob, top = float(entry), []
        result.append(TokenLogprob(token_id=token, logprob=logprob, top=top))
    return result


def _as_dict(item: Any) -> dict[str, Any]:
    """Events and stats come as dicts or as their JSON text, depending on the version."""
    return json.loads(item) if isinstance(item, (str, bytes)) else dict(item)


def encode_params(params: Any) -> dict[str, Any]:
    """`DisaggregatedParams` as JSON: set fields only, `opaque_state` base64, enums by value."""
    encoded: dict[str, Any] = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if value is None or field.name in LOCAL_HANDLES:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        elif hasattr(value, "value") and not isinstance(value, (int, float, str)):
            value = value.value  # an enum (schedule_style)
        encoded[field.name] = value
    return encoded


def decode_params(encoded: dict[str, Any]) -> Any:
    """The prefill side's params, as a `generation_only` request of this worker's version
    (fields it does not know are dropped)."""
    from tensorrt_llm.llmapi import DisaggregatedParams

    known = {field.name for field in dataclasses.fields(DisaggregatedParams)}
    values = {k: v for k, v in encoded.items() if k in known and k not in LOCAL_HANDLES}
    if isinstance(values.get("opaque_state"), str):
        values["opaque_state"] = base64.b64decode(values["opaque_state"])
    values["request_type"] = "generation_only"
    return DisaggregatedParams(**values)

"""TEST DOUBLE of `tensorrt_llm.executor.result`: Logprob, CompletionOutput, GenerationResult,
IterationResult.

Reproduced from the real module: `CompletionOutput` is a slotted dataclass with the diff
properties; a result is cumulative (every `async for` step yields the same object with longer
`token_ids`); finish reasons are set from the engine's reason when the response is final;
stop words are trimmed from `token_ids` only (the logprobs list keeps its entry, as in the
real code); errors surface as `RequestError` while iterating.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

from .._double.queues import Empty, WakeQueue
from .._double.responses import Response, SeqUpdate
from ..disaggregated_params import DisaggregatedParams
from ..sampling_params import SamplingParams
from .utils import RequestError

if TYPE_CHECKING:
    from .._double.engine import Engine
    from .._double.model_files import LightTokenizer

__all__ = ["CompletionOutput", "GenerationResult", "IterationResult", "Logprob"]


@dataclass(slots=True)
class Logprob:
    """Holds logprob and vocab rank for a token."""

    logprob: float
    rank: Optional[int] = None  # noqa: UP045 (keep the real annotation)


# List of token_id -> Logprob dicts for prompt or generation tokens
TokenLogprobs = list[dict[int, Logprob]]


@dataclass(slots=True)
class CompletionOutput:
    """The output data of one completion output of a request."""

    index: int
    text: str = ""
    token_ids: list[int] | None = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: TokenLogprobs | list[float] | None = field(default_factory=list)
    prompt_logprobs: TokenLogprobs | None = field(default_factory=list)
    finish_reason: Literal["stop", "length", "timeout", "cancelled"] | None = None
    stop_reason: int | str | None = None
    generation_logits: Any = None
    additional_context_outputs: dict[str, Any] | None = None
    additional_generation_outputs: dict[str, Any] | None = None
    disaggregated_params: DisaggregatedParams | None = None
    request_perf_metrics: Any = None

    # hidden fields for tracking the diffs
    _last_text_len: int = field(default=0, init=False, repr=False)
    _last_token_ids_len: int = field(default=0, init=False, repr=False)
    _last_logprobs_len: int = field(default=0, init=False, repr=False)
    _incremental_states: dict | None = field(default=None, init=False, repr=False)
    _postprocess_result: Any = None

    @property
    def length(self) -> int:
        return len(self.token_ids or [])

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return (self.token_ids or [])[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> TokenLogprobs | list[float]:
        return (self.logprobs or [])[self._last_logprobs_len :]


class GenerationResult:
    """The result of one request: cumulative outputs, awaitable, (async-)iterable."""

    def __init__(
        self,
        *,
        request_id: int,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        streaming: bool,
        disaggregated_params: DisaggregatedParams | None,
        executor: Engine,
        queue: WakeQueue[Response],
        tokenizer: LightTokenizer | None = None,
    ) -> None:
        self.id = request_id
        self.sampling_params = sampling_params
        self.disaggregated_params = disaggregated_params
        self.decoding_iter = 0
        self.cached_tokens = 0
        self.avg_decoded_tokens_per_iter: float | None = None
        self.metrics_dict: dict[str, Any] = {}
        self.tokenizer = tokenizer
        self._prompt_token_ids = prompt_token_ids
        self._streaming = streaming
        self._done = False
        self._aborted = False
        self._queue = queue
        self._executor = weakref.ref(executor)
        assert sampling_params.best_of is not None
        self._outputs = [CompletionOutput(i) for i in range(sampling_params.best_of)]
        self._context_logits: Any = None
        self._mm_embedding_handle: dict[str, Any] | None = None

    # --- the real attributes -------------------------------------------------------------
    @property
    def request_id(self) -> int:
        return self.id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids

    @property
    def outputs(self) -> list[CompletionOutput]:
        sp = self.sampling_params
        if sp.use_beam_search or sp.n == sp.best_of:
            return self._outputs[: sp.n]
        ranked = sorted(
            self._outputs,
            key=lambda o: o.cumulative_logprob if o.cumulative_logprob is not None else -1e30,
            reverse=True,
        )
        for i, out in enumerate(ranked):
            out.index = i
        return ranked[: sp.n]

    @property
    def context_logits(self) -> Any:
        return self._context_logits

    @property
    def mm_embedding_handle(self) -> dict[str, Any] | None:
        return self._mm_embedding_handle

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Abort the request: the stream ends with finish_reason 'cancelled'."""
        executor = self._executor()
        assert executor is not None, "The executor is not set for this result."
        executor.abort_request(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    # --- waiting -------------------------------------------------------------------------
    def _result_step(self, timeout: float | None = None) -> None:
        self._handle_response(self._queue.get(timeout))

    async def _aresult_step(self) -> None:
        self._handle_response(await self._queue.aget())

    def result(self, timeout: float | None = None) -> GenerationResult:
        while not self._done:
            self._result_step(timeout)
        return self

    async def aresult(self) -> GenerationResult:
        while not self._done:
            await self._aresult_step()
        return self

    def __await__(self) -> Generator[Any, None, GenerationResult]:
        return self.aresult().__await__()

    def __iter__(self) -> GenerationResult:
        return self

    def __next__(self) -> GenerationResult:
        if self._done:
            raise StopIteration
        self._result_step()
        return self

    def __aiter__(self) -> GenerationResult:
        return self

    async def __anext__(self) -> GenerationResult:
        if self._done:
            raise StopAsyncIteration
        await self._aresult_step()
        return self

    # --- applying a response ---------------------------------------------------------------
    def _handle_response(self, response: Response) -> None:
        if response.error is not None:
            self._done = True
            raise RequestError(response.error)
        self._done = response.is_final
        self.decoding_iter += 1
        self.cached_tokens = response.cached_tokens
        self.avg_decoded_tokens_per_iter = 1.0
        if response.context_phase is not None:
            phase = response.context_phase
            self.disaggregated_params = DisaggregatedParams(
                request_type="context_only",
                first_gen_tokens=phase.first_gen_tokens,
                ctx_request_id=phase.req_id,
                opaque_state=phase.opaque_state,
                draft_tokens=phase.draft_tokens,
            )
        for update in response.updates:
            self._handle_sequence(update)
        if self.sampling_params.detokenize and self.tokenizer is not None:
            for out in self.outputs:
                out._last_text_len = len(out.text)
                skip = self.sampling_params.skip_special_tokens
                out.text = self.tokenizer.decode(out.token_ids or [], skip_special_tokens=skip)
                if not self._done or out.finish_reason in ("stop", "length"):
                    self._stop_on_text(out)

    def _stop_on_text(self, out: CompletionOutput) -> None:
        """Stop strings are also matched in the detokenized text (the real result does it)."""
        for reason, _ in self.sampling_params._get_stop_reasons_and_words():
            if isinstance(reason, str) and reason in out.text:
                cut = out.text.find(reason)
                keep = len(reason) if self.sampling_params.include_stop_str_in_output else 0
                out.text = out.text[: cut + keep]
                out.finish_reason = "stop"
                out.stop_reason = reason
                self.abort()
                self._done = True
                break

    def _handle_sequence(self, update: SeqUpdate) -> None:
        out = self._outputs[update.index]
        tokens = out.token_ids if out.token_ids is not None else []
        out.token_ids = tokens
        out.disaggregated_params = self.disaggregated_params
        out._last_token_ids_len = len(tokens)
        tokens.extend(update.new_tokens)
        if update.new_logprobs is not None:
            logprobs = out.logprobs if isinstance(out.logprobs, list) else []
            out._last_logprobs_len = len(logprobs)
            for step in update.new_logprobs:
                logprobs.append({tok: Logprob(logprob=lp, rank=rank) for tok, lp, rank in step})
            out.logprobs = logprobs
        if update.cumulative_logprob is not None:
            out.cumulative_logprob = update.cumulative_logprob
        finish = update.finish
        if finish == "cancelled":
            out.finish_reason = "cancelled"
        elif finish == "end_id":
            out.finish_reason = "stop"
        elif finish == "length":
            out.finish_reason = "length"
        elif finish == "not_finished":
            out.finish_reason = "not_finished"  # type: ignore[assignment]
        elif finish == "stop_words":
            out.finish_reason = "stop"
            for reason, stop_ids in self.sampling_params._get_stop_reasons_and_words():
                if stop_ids and tokens[-len(stop_ids) :] == stop_ids:
                    out.stop_reason = reason
                    if not self.sampling_params.include_stop_str_in_output:
                        out.token_ids = tokens[: -len(stop_ids)]
                    break

    def _repr_fields(self) -> list[str]:
        return ["request_id", "prompt_token_ids", "outputs", "finished", "context_logits"]

    def __repr__(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in self._repr_fields()]
        return f"{self.__class__.__name__}({', '.join(parts)})"

    def __hash__(self) -> int:
        return hash(self.request_id)


class IterationResult:
    """Runtime results (KV events or iteration stats), async-iterable until a timeout."""

    def __init__(self, source: WakeQueue[str] | None = None, timeout: float | None = 2) -> None:
        self._done = False
        self._timeout = timeout
        self._source: WakeQueue[str] = source if source is not None else WakeQueue()

    def set_timeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def mark_undone(self) -> None:
        self._done = False

    def get_results(self) -> list[dict]:
        """Every result that arrives until one get times out."""
        results = []
        while not self._done:
            try:
                if self._timeout is not None and self._timeout <= 0:
                    data = self._source.get_nowait()
                else:
                    data = self._source.get(self._timeout)
            except Empty:
                self._done = True
                break
            results.append(json.loads(data))
        return results

    def __aiter__(self) -> IterationResult:
        return self

    async def __anext__(self) -> dict:
        if self._done:
            raise StopAsyncIteration
        try:
            data = await self._source.aget(self._timeout)
        except Empty:
            self._done = True
            raise StopAsyncIteration from None
        return json.loads(data)

"""TEST DOUBLE of `tensorrt_llm.sampling_params` (SamplingParams, GuidedDecodingParams).

Same field list, defaults, `@dataclass(slots=True, kw_only=True)` shape and `__post_init__`
validation as the real module (TensorRT-LLM `sampling_params.py`); the C++/torch-typed fields
are typed `Any` here because the double has neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True, kw_only=True)
class GuidedDecodingParams:
    """Guided decoding parameters; only one of the fields may be set."""

    json: str | dict | Any | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def _validate(self) -> None:
        num_guides = sum(bool(getattr(self, f.name)) for f in fields(self))
        if num_guides > 1:
            raise ValueError(f"Only one guide can be used for a request, but got {num_guides}.")


@dataclass(slots=True, kw_only=True)
class AdditionalModelOutput:
    """An additional output to gather from the model."""

    name: str
    gather_context: bool


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """Sampling parameters for text generation (see the real class for field semantics)."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    _bad_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    _stop_word_ids: list[list[int]] | None = field(default=None, init=False, repr=False)

    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False

    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False

    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    min_p: float | None = None
    beam_width_array: list[int] | None = None

    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: list[AdditionalModelOutput] | None = None

    _context_logits_auto_enabled: bool = False
    _generation_logits_auto_enabled: bool = False
    _return_log_probs: bool = False

    lookahead_config: Any = None
    guided_decoding: GuidedDecodingParams | None = None

    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    _stream_interval: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        self._validate()

    def _validate(self) -> None:
        """The LLM-API-level checks of the real class (stricter than the C++ executor)."""
        assert self.best_of is not None
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if (
            self.best_of > 1
            and self._greedy_decoding
            and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING", None)
        ):
            raise ValueError(
                f"Greedy decoding in the LLM API does not allow multiple returns. Please set to "
                f"best_of=1, got best_of={self.best_of}. Please set to best_of=1 or set an "
                "environment variable TLLM_ALLOW_N_GREEDY_DECODING=1 to allow best_of > 1 "
                "under the greedy decoding."
            )
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(
                f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}"
            )
        if self.guided_decoding is not None:
            self.guided_decoding._validate()
        # users may pass logprobs=True for top-1 logprobs
        self.logprobs = self.logprobs and int(self.logprobs)
        self.prompt_logprobs = self.prompt_logprobs and int(self.prompt_logprobs)

    @property
    def _greedy_decoding(self) -> bool:
        return (
            not self.use_beam_search
            and (self.top_k is None or self.top_k == 1)
            and (self.top_p is None or self.top_p == 0.0)
        )

    def _setup(
        self,
        tokenizer: Any,
        hf_model_config: Any = None,
        generation_config: Any = None,
        add_special_tokens: bool = False,
    ) -> SamplingParams:
        """Fill end_id/pad_id from the tokenizer and encode bad/stop strings (mutates self)."""
        del hf_model_config, generation_config
        if self.end_id is None:
            self.end_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id
            if self.pad_id is None:
                self.pad_id = self.end_id
        if self.bad is not None:
            strs = [self.bad] if isinstance(self.bad, str) else self.bad
            self._bad_word_ids = [
                tokenizer.encode(s, add_special_tokens=add_special_tokens) for s in strs
            ]
        if self.stop is not None:
            strs = [self.stop] if isinstance(self.stop, str) else self.stop
            self._stop_word_ids = [
                tokenizer.encode(s, add_special_tokens=add_special_tokens) for s in strs
            ]
        return self

    def _get_bad_words(self) -> list[list[int]]:
        words = [[i] for i in self.bad_token_ids] if self.bad_token_ids else []
        if self.bad is None:
            return words
        if self._bad_word_ids is None:
            raise RuntimeError(
                f"{self.__class__.__name__}.bad ({self.bad}) is not processed by tokenizer, "
                "please call the setup method."
            )
        return words + self._bad_word_ids

    def _get_stop_words(self) -> list[list[int]]:
        words = [[i] for i in self.stop_token_ids] if self.stop_token_ids else []
        if self.stop is None:
            return words
        if self._stop_word_ids is None:
            raise RuntimeError(
                f"{self.__class__.__name__}.stop ({self.stop}) is not processed by tokenizer, "
                "please call the setup method."
            )
        return words + self._stop_word_ids

    def _get_stop_reasons_and_words(self) -> list[tuple[int | str, list[int]]]:
        reasons: list[int | str] = []
        if self.stop_token_ids is not None:
            reasons.extend(self.stop_token_ids)
        if self.stop is not None:
            reasons.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        return list(zip(reasons, self._get_stop_words(), strict=False))

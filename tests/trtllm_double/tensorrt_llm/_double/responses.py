"""What the double's executor sends to a request's result object, one per response.

Why: like the real executor's `Response`, the engine thread only ships deltas; the consumer
side (GenerationResult._handle_response) applies them to its cumulative outputs, so result
objects are only ever touched by their consumer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Engine-side finish reasons, mapped to the API strings by the result object:
# end_id -> 'stop' (end token not returned), stop_words -> 'stop' (stop tokens trimmed
# unless include_stop_str_in_output), length, cancelled, not_finished (context_only).
EngineFinish = Literal["end_id", "stop_words", "length", "cancelled", "not_finished"]


@dataclass(slots=True)
class SeqUpdate:
    """New tokens of one output sequence since the previous response."""

    index: int
    new_tokens: list[int]
    new_logprobs: list[list[tuple[int, float, int]]] | None = None  # (token, logprob, rank)
    cumulative_logprob: float | None = None
    finish: EngineFinish | None = None


@dataclass(slots=True)
class ContextPhase:
    """What a context_only request hands to its generation phase."""

    first_gen_tokens: list[int]
    req_id: int
    opaque_state: bytes
    draft_tokens: list[int] | None = None


@dataclass(slots=True)
class Response:
    updates: list[SeqUpdate] = field(default_factory=list)
    is_final: bool = False
    cached_tokens: int = 0
    context_phase: ContextPhase | None = None
    error: str | None = None

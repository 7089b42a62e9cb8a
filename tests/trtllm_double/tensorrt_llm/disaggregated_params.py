"""TEST DOUBLE of `tensorrt_llm.disaggregated_params` (DisaggregatedParams).

Same fields, order, `@dataclass(slots=True, kw_only=True)` shape and `__post_init__` checks
as the real module; the C++ conversion helpers are left out (the double has no bindings).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

_REQUEST_TYPES = ("context_only", "generation_only", "context_and_generation")


class DisaggScheduleStyle(IntEnum):
    CONTEXT_FIRST = 0
    GENERATION_FIRST = 1


@dataclass(slots=True, kw_only=True)
class DisaggregatedParams:
    """Disaggregated serving parameters (request type, first tokens, opaque KV state, ...)."""

    request_type: str | None = None
    # P-D disaggregated params
    first_gen_tokens: list[int] | None = None
    first_gen_log_probs: list | None = None
    first_gen_logits: list | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list[int] | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None
    schedule_style: DisaggScheduleStyle | None = None
    ctx_usage: Any = None
    # E-P disaggregated params
    multimodal_embedding_handles: list[dict[str, Any]] | None = None
    multimodal_hashes: list[list[int]] | None = None
    mrope_position_ids_handle: dict[str, Any] | None = None
    mrope_position_deltas_handle: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.request_type is not None:
            self.request_type = self.request_type.lower()
            if self.request_type not in _REQUEST_TYPES:
                raise ValueError(
                    f"Unknown request type: {self.request_type}. Must be context_only, "
                    "generation_only or context_and_generation"
                )
        if self.multimodal_embedding_handles is not None and self.multimodal_hashes is not None:
            assert len(self.multimodal_embedding_handles) == len(self.multimodal_hashes), (
                "multimodal_embedding_handles and multimodal_hashes must have the same length"
            )
            for mm_hash in self.multimodal_hashes:
                assert isinstance(mm_hash, list), "mm_hash must be a list"
                assert len(mm_hash) == 8, "mm_hash must be a list of 8 integers"
                assert all(isinstance(x, int) for x in mm_hash), "mm_hash must contain integers"

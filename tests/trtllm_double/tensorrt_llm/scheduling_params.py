"""TEST DOUBLE of `tensorrt_llm.scheduling_params` (attention-DP placement hints; ignored)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, kw_only=True)
class SchedulingParams:
    """Schedule parameters: target attention-DP rank and whether it may be relaxed."""

    attention_dp_rank: int | None = None
    attention_dp_relax: bool = True

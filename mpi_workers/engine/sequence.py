"""One request's state inside the engine: its tokens, how many have KV, and its blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contract.messages import PoolingParams, SamplingParams, TokenLogprob

if TYPE_CHECKING:  # torch only for the annotation: the mocker runs without importing it
    import torch

_arrival = itertools.count()


@dataclass(eq=False)
class SeqMedia:
    """One image of a sequence: its placeholder run [offset, offset + length) in the token
    ids and what fills it. `features` (rows [length, hidden] on the model's device) are
    computed from `pixels` once, when a step first needs them, and kept for the sequence's
    life (a preempted sequence recomputes its KV from them); an "embeds" payload is its
    features from the start."""

    offset: int
    length: int
    content_hash: int
    pixels: torch.Tensor | None = None  # [1, C, H, W] as the image processor made them
    features: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens; `num_computed` of them have KV in `block_table`.

    After preemption `num_computed` drops to 0 and the whole token list (prompt and what was
    generated so far) is recomputed as if it were a prompt, then decoding resumes.
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    max_len: int  # prompt + max_tokens, clamped to the engine's max_model_len
    num_prompt_tokens: int = 0
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full computed blocks
    status: SeqStatus = SeqStatus.WAITING
    generator: torch.Generator | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    admitted_once: bool = False
    # Output not yet delivered to the caller.
    pending_tokens: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    # Disaggregated prefill: keep the blocks when the sequence finishes; whoever set this
    # frees them (BlockManager.free on the stepping thread) once the KV has been sent.
    hold_blocks: bool = False
    # Images in prompt order, and `contract.block_hash.media_block_extras` of them: blocks
    # holding image positions hash the image too.
    media: list[SeqMedia] = field(default_factory=list)
    block_extras: dict[int, int] = field(default_factory=dict)
    # `sampling.prompt_logprobs`: the prompt tokens' logprobs computed so far (entry i: token
    # i + 1; filled chunk by chunk during prefill), None once delivered or when not wanted.
    prompt_logprobs: list[TokenLogprob] | None = None
    # `sampling.guided`: the engine's matcher of the output (made at its first sampled step)
    guide: Any = None
    # An embedding request (`GenerateRequest.pooling`): nothing is sampled; the engine pools
    # the final hidden states of the prompt's rows as its chunks are computed (`pooled`: the
    # running sum of MEAN's rows up to position `pooled_upto`, or LAST's row) and finishes
    # it with `embedding` (`contract.messages.encode_embedding`) when the prompt is done.
    pooling: PoolingParams | None = None
    pooled: Any = None
    pooled_upto: int = 0
    embedding: str | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        if self.sampling.prompt_logprobs is not None:
            self.prompt_logprobs = []

    @property
    def reads_no_cache(self) -> bool:
        """Whether every prompt position must be computed here (no prefix cache read): its
        prompt's logprobs, or a MEAN pooling, need each position's hidden state."""
        return self.prompt_logprobs is not None or (
            self.pooling is not None and self.pooling.pooling_type == "MEAN"
        )

    def pool_positions(self, done: int, n: int) -> range:
        """The positions among [done, done + n) whose final hidden states an embedding
        pools: LAST's last prompt position once its chunk computes it; MEAN's each position
        not yet summed (a preempted sequence recomputes its KV, not its sum)."""
        assert self.pooling is not None
        if self.pooling.pooling_type == "LAST":
            last = self.num_prompt_tokens - 1
            return range(last, last + 1) if done <= last < done + n else range(0)
        first = max(done, self.pooled_upto)
        return range(first, max(first, done + n))

    def prompt_logprob_positions(self, done: int, n: int) -> range:
        """The positions among [done, done + n) whose next-token logprob is still owed: each
        prompt position but the last (the next token there is sampled), from the first not
        yet computed (a preempted sequence recomputes its KV, not these)."""
        if self.prompt_logprobs is None:
            return range(0)
        first = max(done, len(self.prompt_logprobs))
        return range(first, max(first, min(done + n, self.num_prompt_tokens - 1)))

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt's logprobs once all are computed (then forgotten: the first chunk
        carries them), else None."""
        entries = self.prompt_logprobs
        if entries is None or len(entries) < self.num_prompt_tokens - 1:
            return None
        self.prompt_logprobs = None
        return entries

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def remaining(self) -> int:
        """Tokens still without KV; the step that computes the last one samples a new token."""
        return len(self.token_ids) - self.num_computed

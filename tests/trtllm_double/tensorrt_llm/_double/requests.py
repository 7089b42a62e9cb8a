"""One request inside the double's executor: its sequences, token rule and disagg state.

Why here: the token rule is the double's whole "model" (see README): token i is a function
of the full sequence so far (prompt + tokens before it) and, for sampled decoding, of the
seed and the output index. So a context phase on one LLM plus a generation phase on another
yields exactly the aggregated tokens, and greedy output never depends on the seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from ..disaggregated_params import DisaggregatedParams
from ..sampling_params import SamplingParams
from . import hashing
from .multimodal import salted
from .queues import WakeQueue
from .responses import EngineFinish, Response

RequestKind = Literal["aggregated", "context_only", "generation_only"]
OPAQUE_MARKER = "tensorrt_llm test double context phase"


@dataclass(slots=True)
class TokenSpace:
    """Which ids the regular draw may return: [low, high) minus the excluded ones."""

    low: int
    high: int
    excluded: frozenset[int]

    @classmethod
    def for_vocab(cls, vocab_size: int, excluded: set[int]) -> TokenSpace:
        low = 32 if vocab_size > 64 else 1
        high = max(vocab_size - 1, low + 1)
        return cls(low, high, frozenset(excluded))

    def pick(self, word: int) -> int:
        span = self.high - self.low
        token = self.low + (word >> 7) % span
        for _ in range(span):
            if token not in self.excluded:
                return token
            token = self.low + (token - self.low + 1) % span
        return token


@dataclass(slots=True)
class Sequence:
    index: int
    salt: int  # 0 = greedy
    state: int  # running hash over prompt + generated tokens
    generated: list[int] = field(default_factory=list)
    logprobs: list[list[tuple[int, float, int]]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    kv_len: int = 0  # tokens whose KV exists (the last sampled token has none yet)
    private: int = 0  # private (unstored) KV blocks held
    finish: EngineFinish | None = None
    sent_tokens: int = 0
    sent_logprobs: int = 0
    finish_sent: bool = False
    prompt_sent: bool = False


@dataclass(slots=True)
class Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    streaming: bool
    queue: WakeQueue[Response]
    kind: RequestKind
    disagg: DisaggregatedParams | None
    salt_id: int | None
    end_id: int  # -1: never ends on a token
    stop_words: list[list[int]]
    bad_tokens: frozenset[int]
    # Multimodal: the digest of the images folded into the token rule, and the id marking
    # image rows in `prompt` (allowed although out of vocabulary); generation_only requests
    # get both from the context phase's opaque_state (they travel with the KV).
    mm_digest: int | None = None
    mm_placeholder: int | None = None
    sequences: list[Sequence] = field(default_factory=list)
    chain: list[int] = field(default_factory=list)  # stored prompt blocks, referenced
    first_tokens: list[int] = field(default_factory=list)  # first token of each sequence
    max_new: int = 0
    cached_tokens: int = 0
    started: bool = False  # context phase ran (its KV exists)
    cancelled: bool = False
    done: bool = False

    @property
    def want_logprobs(self) -> bool:
        return self.params.logprobs is not None and self.params.logprobs is not False


def is_greedy(params: SamplingParams) -> bool:
    """Greedy when temperature is 0, top_k is 1, or nothing asks for sampling."""
    if params.temperature == 0 or params.top_k == 1:
        return True
    return params.temperature is None and params.top_k is None and params.top_p is None


def new_sequences(request: Request, first_state: int) -> list[Sequence]:
    greedy = is_greedy(request.params)
    count = request.params.best_of or request.params.n
    return [
        Sequence(i, 0 if greedy else hashing.sampling_salt(request.params.seed, i), first_state)
        for i in range(count)
    ]


def draw_token(
    request: Request, seq: Sequence, space: TokenSpace
) -> tuple[int, list[tuple[int, float, int]] | None]:
    """The next token of `seq` and, if logprobs were asked for, its fake top-k entry."""
    word = hashing.draw(seq.state, seq.salt)
    min_tokens = request.params.min_tokens or 0
    may_end = request.end_id >= 0 and len(seq.generated) >= min_tokens
    if may_end and word % hashing.EOS_MODULUS == 0:
        token = request.end_id
    else:
        token, retry = space.pick(word), word
        for _ in range(64):  # bad_token_ids: redraw (bounded)
            if token not in request.bad_tokens:
                break
            retry = hashing.mix64(retry ^ 0xBAD)
            token = space.pick(retry)
    entry = logprob_entry(request, seq, space, word, token) if request.want_logprobs else None
    return token, entry


def logprob_entry(
    request: Request, seq: Sequence, space: TokenSpace, word: int, chosen: int
) -> list[tuple[int, float, int]]:
    """Chosen token + the top-k alternatives: fake values, ordered and self-consistent."""
    top_k = int(request.params.logprobs or 0)
    chosen_rank = 1 if seq.salt == 0 else 1 + (word >> 3) % 4
    jitter = ((word >> 20) % 1000) / 20000.0

    def logprob(rank: int) -> float:
        return -(0.05 + 0.45 * (rank - 1)) - jitter

    entry: list[tuple[int, float, int]] = []
    used = {chosen}
    for rank in range(1, top_k + 1):
        if rank == chosen_rank:
            entry.append((chosen, logprob(rank), rank))
            continue
        candidate, salt = chosen, rank
        while candidate in used:
            candidate = space.pick(hashing.mix64(word ^ (salt * 0x9E37)))
            salt += 101
        used.add(candidate)
        entry.append((candidate, logprob(rank), rank))
    if chosen_rank > top_k:
        entry.append((chosen, logprob(chosen_rank), chosen_rank))
    return entry


def prompt_digest(prompt: list[int]) -> str:
    return hashlib.sha256(json.dumps(prompt).encode()).hexdigest()


def opaque_state(request: Request, tokens_per_block: int, first_tokens: list[int]) -> bytes:
    """What 'moves' with the KV: enough for a generation double to verify the handoff."""
    return json.dumps(
        {
            "double": OPAQUE_MARKER,
            "prompt_sha256": prompt_digest(request.prompt),
            "prompt_len": len(request.prompt),
            "first_gen_tokens": first_tokens,
            "tokens_per_block": tokens_per_block,
            "ctx_request_id": request.request_id,
            "mm_digest": request.mm_digest,
            "mm_placeholder": request.mm_placeholder,
        }
    ).encode()


def check_transfer(request: Request, tokens_per_block: int) -> str | None:
    """Why the KV of a generation_only request cannot be 'received', or None when it can."""
    params = request.disagg
    assert params is not None
    if not params.first_gen_tokens:
        return "KV cache transfer failed: generation_only needs first_gen_tokens"
    if not isinstance(params.opaque_state, bytes | bytearray):
        return "KV cache transfer failed: generation_only needs opaque_state bytes"
    try:
        state = json.loads(bytes(params.opaque_state))
    except ValueError:
        state = None
    if not isinstance(state, dict) or state.get("double") != OPAQUE_MARKER:
        return "KV cache transfer failed: opaque_state does not come from a context phase"
    if state.get("prompt_sha256") != prompt_digest(request.prompt):
        return (
            "KV cache transfer failed: prompt_token_ids differ from the context phase's "
            f"(context request {state.get('ctx_request_id')})"
        )
    if state.get("tokens_per_block") != tokens_per_block:
        return (
            f"KV cache transfer failed: tokens_per_block {state.get('tokens_per_block')} "
            f"(context) != {tokens_per_block} (generation)"
        )
    if list(state.get("first_gen_tokens") or []) != list(params.first_gen_tokens):
        return "KV cache transfer failed: first_gen_tokens differ from the context phase's"
    if state.get("mm_digest") is not None:  # the images' KV came along
        request.mm_digest = int(state["mm_digest"])
        request.mm_placeholder = state.get("mm_placeholder")
        request.salt_id = salted(request.salt_id, request.mm_digest)
    return None

"""Deterministic 64-bit mixing: the double's "model" and its KV block hashes.

Why: tests need generation that is reproducible token by token (aggregated == prefill +
decode), cheap, and able to hit EOS; and block hashes that are stable but deliberately NOT
hpcserve's own hash, so an adapter that recomputes hashes instead of passing the engine's
through is caught.
"""

from __future__ import annotations

from collections.abc import Iterable

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_BLOCK_SEED = 0xD1B54A32D192ED03
_STATE_SEED = 0x8CB92BA72F3D8DD7
_SALT_SEED = 0xA0761D6478BD642F

# EOS rule (documented in README): a step whose draw r has r % EOS_MODULUS == 0 emits the
# request's end id (unless ignore_eos, min_tokens or end_id=-1 forbid it).
EOS_MODULUS = 97


def mix64(x: int) -> int:
    """splitmix64 finaliser: a bijective scramble of a 64-bit integer."""
    x = (x + _GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def absorb(state: int, tokens: Iterable[int]) -> int:
    """Fold tokens into a running sequence state (order sensitive)."""
    for token in tokens:
        state = mix64(state ^ (token & MASK64))
    return state


def initial_state() -> int:
    return mix64(_STATE_SEED)


def draw(state: int, salt: int) -> int:
    """The step's random word: depends on the whole sequence (state) and the salt."""
    return mix64(state ^ salt)


def sampling_salt(seed: int | None, sequence_index: int) -> int:
    """Salt of a sampled (non-greedy) sequence; greedy decoding uses salt 0."""
    value = mix64(_SALT_SEED ^ ((seed or 0) & MASK64))
    return mix64(value ^ (sequence_index + 1)) | 1


def string_id(text: str) -> int:
    """A stable 64-bit id of a string (cache_salt)."""
    return absorb(mix64(_SALT_SEED), text.encode("utf-8"))


def block_hash(parent: int | None, tokens: Iterable[int], salt_id: int | None = None) -> int:
    """Hash of a full KV block: chained on its parent; the first block carries the salt."""
    start = _BLOCK_SEED if parent is None else parent
    if parent is None and salt_id is not None:
        start ^= mix64(salt_id)
    state = mix64(start)
    for token in tokens:
        state = mix64(state ^ ((token + 0x1F) & MASK64))
    return state

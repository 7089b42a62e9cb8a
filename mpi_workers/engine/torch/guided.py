"""Constrained output in the torch engine: one llguidance matcher per guided sequence.

Each step, the sampled rows whose request carries `SamplingParams.guided` get the set of
tokens their grammar allows next as a bitmask computed on the CPU (llguidance, all rows in
one parallel call), applied to their logits on the logits' device before any sampling (the
greedy path too); the token sampled is then consumed by the row's matcher. When the grammar
is complete (the matcher admits nothing but EOS) the sequence stops, finish "stop".

A matcher is made on the sequence's first sampled step from the grammar of
`contract.guided` (cached per constraint text) and first consumes what the sequence already
holds as output: its own output tokens (a preempted and recomputed sequence keeps them),
and the `guided.generated` last prompt tokens a migrated request carries. The llguidance
tokenizer (the model folder's tokenizer.json, ~0.2 s) is built on the first guided request:
an engine serving none never imports llguidance.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contract.guided import grammar_for
from contract.messages import GuidedDecoding
from mpi_workers.engine.torch.host_copy import to_device

if TYPE_CHECKING:
    from llguidance import LLExecutor, LLMatcher, LLTokenizer

logger = logging.getLogger(__name__)

BITS = 32  # tokens per bitmask word (llguidance's int32 words)


class GuideError(RuntimeError):
    """A guided sequence's matcher refused a token (or could not be built)."""


class Guides:
    """The engine's llguidance state: tokenizer and executor (built on first use), and the
    matchers' lifecycle (make, mask, consume). Used on the stepping thread only."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size  # the logits' width: the bitmask covers every column
        self.eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: LLTokenizer | None = None
        self._executor: LLExecutor | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                path = self.model_dir / "tokenizer.json"
                if not path.is_file():
                    raise GuideError(f"constrained output needs {path} (not found)")
                self._tokenizer = llguidance.LLTokenizer(
                    path.read_text(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                )
                self._executor = llguidance.LLExecutor()
                logger.info("llguidance tokenizer built for %s", self.model_dir)
            return self._tokenizer

    def matcher(self, guided: GuidedDecoding, output: list[int]) -> LLMatcher:
        """A matcher for `guided` that has consumed `output` (the sequence's output so far)."""
        from llguidance import LLMatcher

        found = LLMatcher(self.tokenizer, grammar_for(guided), log_level=0)
        if output and not found.consume_tokens(output):
            raise GuideError(f"the output so far breaks the constraint: {found.get_error()}")
        if found.is_error():
            raise GuideError(found.get_error())
        return found

    def bitmask(self, matchers: list[LLMatcher]) -> torch.Tensor:
        """The allowed next tokens of each matcher: int32 [len(matchers), words] on the CPU,
        bit t % 32 of word t // 32 set when token t is allowed."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        mask = allocate_token_bitmask(len(matchers), self.vocab_size)
        assert self._executor is not None  # made with the tokenizer, before any matcher
        fill_next_token_bitmask_par(
            self._executor, [(m, i) for i, m in enumerate(matchers)], mask
        )
        return mask

    @staticmethod
    def consume(matcher: LLMatcher, token: int) -> bool:
        """Feed the sampled `token`; True when the output is complete (only EOS may follow)."""
        if not matcher.consume_token(token):
            raise GuideError(f"token {token} breaks the constraint: {matcher.get_error()}")
        return matcher.is_stopped()


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` with every token that `bitmask` (one row per entry of `rows`) forbids at
    -inf in those rows. Returns a new tensor."""
    device = logits.device
    forbidden = ~allowed_tokens(bitmask, logits.shape[-1], device)
    if len(rows) == logits.shape[0]:
        return logits.masked_fill(forbidden, float("-inf"))
    index = to_device(rows, torch.long, device)
    constrained = logits.index_select(0, index).masked_fill_(forbidden, float("-inf"))
    return logits.index_copy(0, index, constrained)


def allowed_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """bool [rows, vocab] on `device`: token t of a row is allowed when bit t % 32 of its word
    t // 32 is set. On the CPU numpy unpacks the bits (the words' bytes in little-endian
    order: bit t is bit t % 8 of byte t // 8); on a GPU they are unpacked there (a copy of 4
    bytes per 32 tokens crosses, not a byte per token)."""
    if device.type == "cpu" and sys.byteorder == "little":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab]).bool()
    words = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(BITS, dtype=torch.int32, device=device)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]


def guide_rows(guides: list[Any]) -> tuple[list[int], list[Any]]:
    """(row indices, matchers) of the rows of a step that carry a matcher."""
    rows = [i for i, guide in enumerate(guides) if guide is not None]
    return rows, [guides[i] for i in rows]

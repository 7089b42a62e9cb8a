"""The engine-side steps of disaggregated serving, as small functions on a `TorchEngine`.

Functions named `*_on_thread` touch the block manager or the scheduler and must run on the
stepping thread (`engine.call_in_engine_thread`); the others are pure or run anywhere.
Token-identical output with aggregated serving follows from doing exactly what the
aggregated engine does: the prefill worker runs the prompt as one request and samples the
first token with the request's generator; the decode worker imports the prompt's KV and the
generator's state and continues from the same sequence state an aggregated engine would have.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import torch

from contract.messages import GenerateOutput, GenerateRequest
from mpi_workers.engine.sequence import SeqStatus, Sequence
from mpi_workers.kv_transfer.layout import KvLayout


@dataclass
class Reservation:
    """Blocks a decode worker holds for a prompt; the first `skip_blocks` it already had."""

    seq: Sequence
    block_ids: list[int]
    skip_blocks: int

    @property
    def missing_blocks(self) -> list[int]:
        return self.block_ids[self.skip_blocks :]


def kv_layout(engine: Any) -> KvLayout:
    cfg = engine.config
    tp = getattr(engine, "tp", None)
    return KvLayout(
        num_layers=cfg.num_layers,
        block_size=engine.block_size,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=str(engine.dtype).removeprefix("torch."),
        tp_size=tp.size if tp is not None else 1,
    )


def check_single_rank(engine: Any) -> None:
    """KV transfer moves the leader's cache only: a TP group would need every rank's shard."""
    tp = getattr(engine, "tp", None)
    if tp is not None and tp.size > 1:
        raise NotImplementedError(
            "KV transfer with tensor parallelism (tp > 1) is not wired yet: each rank would "
            "send its head range (see kv_transfer.layout.plan_head_transfers)"
        )


def prompt_blocks(engine: Any, num_prompt_tokens: int) -> int:
    return -(-num_prompt_tokens // engine.block_size)


# ----- prefill side ------------------------------------------------------------------------


def prefill_sequence(engine: Any, request: GenerateRequest) -> Sequence:
    """The prompt as a one-token request that keeps its blocks when it finishes."""
    seq = engine._make_sequence(request)
    seq.max_len = min(seq.num_prompt_tokens + 1, seq.max_len)
    seq.hold_blocks = True
    return seq


def first_finish_reason(engine: Any, request: GenerateRequest, token: int) -> str | None:
    """Why the request ends at its first token under its real limits (the engine's rule)."""
    p = request.sampling
    if (not p.ignore_eos and token in engine.eos_token_ids) or token in p.stop_token_ids:
        return "stop"
    max_len = min(len(request.token_ids) + p.max_tokens, engine.max_model_len)
    if len(request.token_ids) + 1 >= max_len:
        return "length"
    return None


def free_on_thread(engine: Any, seq: Sequence) -> None:
    """Release a held or reserved sequence's blocks (idempotent: free empties the table)."""
    seq.hold_blocks = False
    engine.block_manager.free(seq)


def generator_state(seq: Sequence) -> str | None:
    if seq.generator is None:
        return None
    return base64.b64encode(seq.generator.get_state().numpy().tobytes()).decode()


def restore_generator(state: str | None) -> torch.Generator | None:
    if state is None:
        return None
    generator = torch.Generator()
    raw = bytearray(base64.b64decode(state))
    generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
    return generator


# ----- decode side -------------------------------------------------------------------------


def reserve_on_thread(engine: Any, request: GenerateRequest) -> Reservation | None:
    """Blocks for the whole prompt, reusing cached prefix blocks; None if the pool is short."""
    seq = engine._make_sequence(request)
    if not engine.block_manager.admit(seq, seq.num_tokens):
        return None
    skip = seq.num_computed // engine.block_size
    return Reservation(seq, list(seq.block_table), skip)


def activate_on_thread(engine: Any, seq: Sequence, first: GenerateOutput) -> None:
    """The prompt's KV has landed: hash its blocks and run the sequence from its first token."""
    seq.num_computed = seq.num_prompt_tokens
    engine.block_manager.commit(seq)  # prefix reuse for later requests + KV stored events
    seq.token_ids.extend(first.token_ids)
    seq.pending_tokens = []
    seq.num_cached_tokens = first.num_cached_tokens
    seq.admitted_once = True
    seq.status = SeqStatus.RUNNING
    engine.scheduler.running.append(seq)

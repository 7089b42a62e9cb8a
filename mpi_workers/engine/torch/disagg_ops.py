"""The engine-side steps of disaggregated serving, as small functions on a `TorchEngine`.

Functions named `*_on_thread` touch the block manager or the scheduler and must run on the
stepping thread (`engine.call_in_engine_thread`); the others are pure or run anywhere.
Token-identical output with aggregated serving follows from doing exactly what the
aggregated engine does: the prefill worker runs the prompt as one request and samples the
first token with the request's generator; the decode worker imports the prompt's KV and the
generator's state and continues from the same sequence state an aggregated engine would have.
Under tensor parallelism the KV moves between the leader and its ranks' head shards on the
stepping thread (`export_on_thread`, `import_on_thread`; see `kv_transfer.shards`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import torch

from contract.messages import GenerateOutput, GenerateRequest
from mpi_workers.engine.sequence import SeqStatus, Sequence
from mpi_workers.kv_transfer.blocks import empty_staging
from mpi_workers.kv_transfer.layout import KvLayout
from mpi_workers.kv_transfer.shards import KvGather, KvScatter, lead_gather, lead_scatter


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
    """This group's side of the handshake: the model's global KV heads and our TP degree
    (the transfer itself always carries every global head: see `staging_for`)."""
    cfg = engine.config
    return KvLayout(
        num_layers=cfg.num_layers,
        block_size=engine.block_size,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=str(engine.dtype).removeprefix("torch."),
        tp_size=tp_size(engine),
    )


def tp_size(engine: Any) -> int:
    tp = getattr(engine, "tp", None)
    return tp.size if tp is not None else 1


def staging_for(engine: Any, num_blocks: int) -> torch.Tensor:
    """An empty transfer buffer for `num_blocks`: every *global* KV head of the model,
    whatever this group's TP degree (the leader scatters or gathers the rank shards)."""
    return empty_staging(engine.kv_cache.k, num_blocks, engine.config.num_kv_heads)


def export_on_thread(engine: Any, block_ids: list[int]) -> torch.Tensor:
    """Under TP (stepping thread): every rank's heads of `block_ids`, joined on the leader."""
    if not block_ids:
        return staging_for(engine, 0)
    return engine.run_group_command(
        KvGather(list(block_ids)),
        lambda: lead_gather(engine.tp, engine.kv_cache, block_ids, engine.config.num_kv_heads),
    )


def import_on_thread(engine: Any, staging: torch.Tensor, block_ids: list[int]) -> None:
    """Under TP (stepping thread): write the received global staging into every rank's heads
    of `block_ids`."""
    if not block_ids:
        return
    engine.run_group_command(
        KvScatter(list(block_ids)),
        lambda: lead_scatter(
            engine.tp, engine.kv_cache, staging, block_ids, engine.config.num_kv_heads
        ),
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
    """Why the request ends at its first token under its real limits."""
    p = request.sampling
    max_len = min(len(request.token_ids) + p.max_tokens, engine.max_model_len)
    return engine.finish_reason(p, token, len(request.token_ids) + 1, max_len)


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

"""`TorchKvHandoff`: the torch engine's side of disaggregated serving (`BlockKvHandoff`).

Token-identical output with aggregated serving follows from doing exactly what the
aggregated engine does: the prefill worker runs the prompt as one request and samples the
first token with the request's generator; the decode worker imports the prompt's KV and the
generator's state and continues from the same sequence state an aggregated engine would have.
Images: the prefill side encodes them; the decode side's blocks hash them the same way (a
prefix hit there skips their transfer) and it keeps the prepared media, so a preempted
decode recomputes its prompt exactly. An output constraint: the prefill side's matcher
constrains the first token (a first token that completes the output ends it, "stop"); the
decode side's matcher is made at its first step and consumes that token first.

The block manager and scheduler are only touched on the stepping thread
(`call_in_engine_thread`). Under tensor parallelism the KV moves between the leader and its
ranks' head shards on that thread too (`kv_transfer.shards`); with TP 1 packing and
unpacking run off it (the blocks are held or reserved: no step touches them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import torch

from contract.messages import GenerateOutput, GenerateRequest, SamplingParams
from mpi_workers.engine.base import BlockKvHandoff, HeldPrefill, KvReservation
from mpi_workers.engine.sequence import SeqMedia, SeqStatus, Sequence
from mpi_workers.kv_transfer.blocks import empty_staging, pack_blocks, unpack_blocks
from mpi_workers.kv_transfer.layout import KvLayout
from mpi_workers.kv_transfer.shards import KvGather, KvScatter, lead_gather, lead_scatter

if TYPE_CHECKING:
    from mpi_workers.engine.block_manager import BlockManager
    from mpi_workers.engine.scheduler import Scheduler
    from mpi_workers.engine.torch.kv_cache import KvCache
    from mpi_workers.engine.torch.model_config import ModelConfig
    from mpi_workers.engine.torch.tp import TpRuntime


class TorchKvHandoff(BlockKvHandoff):
    """Mixed into `TorchEngine`; uses its cache, block manager, scheduler and thread."""

    config: ModelConfig
    block_size: int
    max_model_len: int
    dtype: torch.dtype
    tp: TpRuntime | None
    kv_cache: KvCache
    block_manager: BlockManager
    scheduler: Scheduler

    if TYPE_CHECKING:  # provided by TorchEngine

        async def call_in_engine_thread(self, fn: Callable[[], Any]) -> Any: ...
        def run_group_command(self, command: Any, lead: Callable[[], Any]) -> Any: ...
        def stream_sequence(self, seq: Sequence, *, add: bool = True) -> Any: ...
        def make_sequence(
            self, request: GenerateRequest, media: list[SeqMedia] | None = None
        ) -> Sequence: ...
        def finish_reason(
            self, sampling: SamplingParams, token: int, num_tokens: int, max_len: int
        ) -> str | None: ...

    @property
    def _tp_size(self) -> int:
        return self.tp.size if self.tp is not None else 1

    def kv_layout(self) -> KvLayout:
        cfg = self.config
        return KvLayout(
            num_layers=cfg.num_layers,
            block_size=self.block_size,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=str(self.dtype).removeprefix("torch."),
            tp_size=self._tp_size,
        )

    def new_staging(self, num_blocks: int) -> torch.Tensor:
        """Every *global* KV head of the model, whatever this group's TP degree."""
        return empty_staging(self.kv_cache.k, num_blocks, self.config.num_kv_heads)

    # ----- prefill side --------------------------------------------------------------------
    async def prefill_and_hold(
        self, request: GenerateRequest, media: list[SeqMedia] | None = None
    ) -> HeldPrefill:
        seq = self.make_sequence(request, media)  # a one-token request that keeps its blocks
        seq.max_len = min(seq.num_prompt_tokens + 1, seq.max_len)
        seq.hold_blocks = True
        last: GenerateOutput | None = None
        tokens: list[int] = []
        logprobs: list[Any] = []
        try:
            async for output in self.stream_sequence(seq):
                tokens.extend(output.token_ids)
                logprobs.extend(output.logprobs or [])
                last = output
        except BaseException:
            await self._free_soon(seq)
            raise
        assert last is not None
        if last.finish_reason == "error" or not tokens:
            await self._free_soon(seq)
            raise RuntimeError(last.error or f"prefill ended with {last.finish_reason}")
        p = request.sampling
        max_len = min(len(request.token_ids) + p.max_tokens, self.max_model_len)
        reason = self.finish_reason(p, tokens[0], seq.num_prompt_tokens + 1, max_len)
        if reason is None and seq.guide is not None and seq.guide.is_stopped():
            reason = "stop"  # the first token completed the constrained output
        first = last.model_copy(
            update={
                "token_ids": tokens,
                "logprobs": logprobs if last.logprobs is not None else None,
                "finish_reason": reason,
            }
        )
        return HeldPrefill(request.request_id, first, _generator_state(seq), seq)

    async def export_held(self, held: HeldPrefill, skip_blocks: int) -> torch.Tensor:
        seq: Sequence = held.handle
        num_blocks = -(-seq.num_prompt_tokens // self.block_size)
        block_ids = list(seq.block_table[skip_blocks:num_blocks])
        try:
            if self._tp_size == 1:
                cache = self.kv_cache
                return await asyncio.to_thread(pack_blocks, cache.k, cache.v, block_ids)
            return await self.call_in_engine_thread(lambda: self._gather(block_ids))
        finally:
            await self._free_soon(seq)

    async def release_held(self, held: HeldPrefill) -> None:
        await self._free_soon(held.handle)

    def _gather(self, block_ids: list[int]) -> torch.Tensor:
        """Stepping thread, TP > 1: every rank's heads of `block_ids`, joined on the leader."""
        if not block_ids:
            return self.new_staging(0)
        assert self.tp is not None
        return self.run_group_command(
            KvGather(block_ids),
            lambda: lead_gather(self.tp, self.kv_cache, block_ids, self.config.num_kv_heads),
        )

    # ----- decode side ---------------------------------------------------------------------
    async def reserve(
        self, request: GenerateRequest, media: list[SeqMedia] | None = None
    ) -> KvReservation | None:
        def on_thread() -> KvReservation | None:
            seq = self.make_sequence(request, media)  # image blocks hash their image
            if not self.block_manager.admit(seq, seq.num_tokens):
                return None
            skip = seq.num_computed // self.block_size
            return KvReservation(request.request_id, skip, len(seq.block_table) - skip, seq)

        return await self.call_in_engine_thread(on_thread)

    async def import_kv(self, reservation: KvReservation, staging: torch.Tensor) -> None:
        seq: Sequence = reservation.handle
        block_ids = list(seq.block_table[reservation.skip_blocks :])
        if not block_ids:
            return
        if self._tp_size == 1:
            cache = self.kv_cache
            await asyncio.to_thread(unpack_blocks, staging, cache.k, cache.v, block_ids)
            return
        assert self.tp is not None
        await self.call_in_engine_thread(
            lambda: self.run_group_command(
                KvScatter(block_ids),
                lambda: lead_scatter(
                    self.tp, self.kv_cache, staging, block_ids, self.config.num_kv_heads
                ),
            )
        )

    async def release_reservation(self, reservation: KvReservation) -> None:
        await self._free_soon(reservation.handle)

    async def decode_reserved(
        self, reservation: KvReservation, first: GenerateOutput, sampler_state: str | None,
        media: list[SeqMedia] | None = None,
    ) -> AsyncIterator[GenerateOutput]:
        seq: Sequence = reservation.handle
        seq.generator = _restore_generator(sampler_state)
        if media is not None:  # not yet stepped: set before the stepping thread sees it
            seq.media = list(media)
        stream = self.stream_sequence(seq, add=False)
        try:
            await self.call_in_engine_thread(lambda: self._activate(seq, first))
        except BaseException:
            await stream.aclose()
            await self._free_soon(seq)
            raise
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()  # a consumer that stops early aborts the request

    def _activate(self, seq: Sequence, first: GenerateOutput) -> None:
        """Stepping thread: the prompt's KV has landed; hash its blocks and run the sequence
        from its first token."""
        seq.num_computed = seq.num_prompt_tokens
        self.block_manager.commit(seq)  # prefix reuse for later requests + KV stored events
        seq.token_ids.extend(first.token_ids)
        seq.pending_tokens = []
        seq.num_cached_tokens = first.num_cached_tokens
        seq.admitted_once = True
        seq.status = SeqStatus.RUNNING
        self.scheduler.running.append(seq)

    # ----- both ----------------------------------------------------------------------------
    async def _free_soon(self, seq: Sequence) -> None:
        """Free on the stepping thread even when the calling task is being cancelled
        (idempotent: free empties the block table)."""

        def free() -> None:
            seq.hold_blocks = False
            self.block_manager.free(seq)

        task = asyncio.ensure_future(self.call_in_engine_thread(free))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)


def _generator_state(seq: Sequence) -> str | None:
    if seq.generator is None:
        return None
    return base64.b64encode(seq.generator.get_state().numpy().tobytes()).decode()


def _restore_generator(state: str | None) -> torch.Generator | None:
    if state is None:
        return None
    generator = torch.Generator()
    raw = bytearray(base64.b64decode(state))
    generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
    return generator

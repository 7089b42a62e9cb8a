"""Paged attention over a flat (varlen) batch of tokens, in plain PyTorch.

One step's tokens are laid out as: every single-token sequence first (decode, batched into
one padded SDPA call), then each multi-token chunk (prefill, one SDPA call per sequence,
with a bottom-right causal mask when earlier KV already sits in the cache). K/V of the new
tokens are written into the paged cache with `slot_mapping` (slot = block * block_size +
offset) and read back with `index_select` into buffers allocated once per step and shared
by every layer (measured fastest on CPU; see the engine-anchors note).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mpi_workers.engine.torch import triton_attention


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens [start, end) in the flat batch."""

    start: int
    end: int
    gather_slots: torch.Tensor | None  # slots of all context tokens; None: no cached prefix
    mask: torch.Tensor | None = None  # bottom-right causal mask when gather_slots is set


@dataclass
class AttentionMetadata:
    """Per-step description of where each token's KV goes and what it attends to."""

    slot_mapping: torch.Tensor  # [num_tokens] long
    num_decode: int = 0
    decode_max_len: int = 0
    decode_gather_slots: torch.Tensor | None = None  # [num_decode * decode_max_len]
    # or, instead of slots, whole blocks: [num_decode * decode_max_len / block_size] block ids
    decode_gather_blocks: torch.Tensor | None = None
    block_size: int = 0  # tokens per cache block (for decode_gather_blocks)
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, decode_max_len] bool or None
    # For the device path's paged decode kernel (CPU C, CUDA Triton), instead of gather + mask:
    decode_attention: Callable[..., torch.Tensor] | None = None
    decode_block_tables: torch.Tensor | None = None  # [num_decode, blocks]
    decode_lens: torch.Tensor | None = None  # [num_decode] context lengths
    prefills: list[PrefillChunk] = field(default_factory=list)
    # CUDA varlen kernel, instead of `prefills`: rows from `varlen_first` on are query runs
    # [query_start[s], query_start[s + 1]) (relative to varlen_first) over their paged context.
    varlen_first: int = 0
    varlen_tables: torch.Tensor | None = None  # [runs, blocks]
    varlen_query_start: torch.Tensor | None = None  # [runs + 1]
    varlen_context_lens: torch.Tensor | None = None  # [runs], new tokens included
    varlen_programs: int | None = None  # fixed launch shape (graphs); None: from the shapes
    cos: torch.Tensor | None = None  # RoPE tables for this step's positions
    sin: torch.Tensor | None = None
    gather_k: torch.Tensor | None = None  # preallocated gather buffers shared by layers
    gather_v: torch.Tensor | None = None

    def prepare_buffers(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Allocate the K/V gather buffers once for the largest read of this step, and turn
        boolean masks into additive ones of `dtype` once (SDPA would convert a bool mask in
        every layer; adding 0.0 leaves the kept scores bitwise unchanged)."""
        if self.decode_mask is not None and self.decode_mask.dtype == torch.bool:
            self.decode_mask = additive_mask(self.decode_mask, dtype)
        for chunk in self.prefills:
            if chunk.mask is not None and chunk.mask.dtype == torch.bool:
                chunk.mask = additive_mask(chunk.mask, dtype)
        sizes = [len(p.gather_slots) for p in self.prefills if p.gather_slots is not None]
        if self.decode_gather_slots is not None:
            sizes.append(len(self.decode_gather_slots))
        if self.decode_gather_blocks is not None:
            sizes.append(self.num_decode * self.decode_max_len)
        if sizes:
            n = max(sizes)
            device = self.slot_mapping.device
            self.gather_k = torch.empty(n, num_kv_heads, head_dim, dtype=dtype, device=device)
            self.gather_v = torch.empty_like(self.gather_k)

    @staticmethod
    def bottom_right_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        # Query i sits at context position kv_len - q_len + i and sees keys up to it.
        ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        return ones.tril(diagonal=kv_len - q_len)


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `keep`, -inf elsewhere (what SDPA adds to the scores)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
        ~keep, float("-inf")
    )


def _gather(cache: torch.Tensor, slots: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    out = buf[: len(slots)]
    torch.index_select(cache, 0, slots, out=out)
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    cached: bool = False,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [num_blocks, block_size, KVH, D] -> [T, H, D].
    `cached`: k and v are already in the caches at `meta.slot_mapping` (the fused RoPE)."""
    num_tokens, _, head_dim = q.shape
    kv_heads = k.shape[1]
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    if not cached:
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
    if meta.num_decode == num_tokens and meta.num_decode > 0:
        return _decode(q, k_cache, v_cache, meta, scale)
    if meta.varlen_tables is not None:
        return _varlen(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.num_decode:
        out[: meta.num_decode] = _decode(q[: meta.num_decode], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        qs = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        if chunk.gather_slots is None:
            ks = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            vs = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            ks = _gather(k_flat, chunk.gather_slots, meta.gather_k).transpose(0, 1).unsqueeze(0)
            vs = _gather(v_flat, chunk.gather_slots, meta.gather_v).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=chunk.mask, scale=scale, enable_gqa=True
            )
        out[chunk.start : chunk.end] = o.squeeze(0).transpose(0, 1)
    return out


def _varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Decode rows (if any) through the split-K decode kernel, every query run after them
    through the varlen kernel: K/V read in place, a cached prefix included."""
    assert meta.varlen_query_start is not None and meta.varlen_context_lens is not None
    first = meta.varlen_first
    runs = triton_attention.paged_varlen_attention(
        q[first:], k_cache, v_cache, meta.varlen_tables, meta.varlen_query_start,
        meta.varlen_context_lens, scale, meta.varlen_programs,
    )  # fmt: skip
    if first == 0:
        return runs
    out = torch.cat([_decode(q[:first], k_cache, v_cache, meta, scale), runs])
    return out


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if meta.decode_attention is not None:  # K/V read in place (the device path's kernel)
        return meta.decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_lens, scale,
            meta.decode_max_len,
        )  # fmt: skip
    batch, _, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    length = meta.decode_max_len
    if meta.decode_gather_blocks is not None:
        # Whole blocks: one row per block instead of one per token (fewer, longer copies).
        blocks = meta.decode_gather_blocks
        row = (-1, meta.block_size * kv_heads, head_dim)
        used = batch * length
        ks = _gather(k_flat.view(row), blocks, meta.gather_k[:used].view(row))
        vs = _gather(v_flat.view(row), blocks, meta.gather_v[:used].view(row))
    else:
        ks = _gather(k_flat, meta.decode_gather_slots, meta.gather_k)
        vs = _gather(v_flat, meta.decode_gather_slots, meta.gather_v)
    ks = ks.view(batch, length, kv_heads, head_dim).transpose(1, 2)
    vs = vs.view(batch, length, kv_heads, head_dim).transpose(1, 2)
    # One query per row: fold each KV head's query group into the query axis, so the masked
    # call is plain MHA ([B, KVH, group, D]) and runs the fused kernels instead of the GQA
    # fallback (which repeats K/V per query head). Measured faster on CPU and GPU.
    group = q.shape[1] // kv_heads
    o = F.scaled_dot_product_attention(
        q.view(batch, kv_heads, group, head_dim), ks, vs, attn_mask=meta.decode_mask, scale=scale
    )
    return o.reshape(batch, kv_heads * group, head_dim)

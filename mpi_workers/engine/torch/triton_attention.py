"""Paged decode attention on CUDA (Triton): K/V read in place through the block tables.

Why: the PyTorch path copies every row's padded context out of the paged cache in every layer
and runs a masked SDPA over the copy (56 % of GPU time at batch 128 on an H200, see
`shared/notes/gpu-engine-profile.md`). Here each program reads the K/V rows of its sequence
straight from the cache ([num_blocks, block_size, kv_heads, head_dim]) through the block
table, for one KV head and the whole query group that shares it (GQA: K/V loaded once per
group), with an online softmax.

Split-K ("flash-decoding"): at small batches (batch × kv_heads programs would leave most SMs
idle) the context is cut into splits run in parallel, each writing a partial output and its
log-sum-exp; a second kernel combines them. The split count depends only on the batch, the
KV heads and the padded context length, so a CUDA graph captured for one (batch, context)
bucket keeps one launch shape.

Varlen ("unified") attention: `paged_varlen_attention` serves a flat batch of query runs of
any lengths (prefill chunks, with or without a cached prefix, and decode rows as runs of one)
in one launch, every key read in place through the block tables. A prefix-cache hit thus
costs no copy, and because the launch shape depends only on the padded token and sequence
counts, a mixed prefill + decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

try:  # the device's torch ships Triton; CPU-only installs may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None

BLOCK_N = 64  # context tokens per inner iteration
# One inner iteration per split at the least: at batch 1 a split is latency-bound (a 256-token
# split took 8 us per layer for 2 MB of K/V on an H200; 64-token ones spread it over 10x
# the SMs).
MIN_TOKENS_PER_SPLIT = BLOCK_N
MAX_SPLITS = 64


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return num_heads % num_kv_heads == 0 and head_dim <= 256


def num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, each split at least one inner iteration."""
    programs = batch * kv_heads
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= target:
        return 1
    useful = -(-max_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(-(-target // programs), useful, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    max_len: int,
    splits: int | None = None,
) -> torch.Tensor:
    """q: [B, H, D]; caches: [num_blocks, block_size, KVH, D]; block_tables: [B, blocks];
    lens: [B] context lengths (the new token included); `max_len` bounds them (a Python int:
    it fixes the launch shape). Returns [B, H, D] in q's dtype."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if splits is None:
        splits = num_splits(batch, kv_heads, max_len, q.device)
    chunk = -(-max_len // splits)
    per_split = -(-chunk // BLOCK_N) * BLOCK_N  # whole inner iterations per split
    out = torch.empty_like(q)
    q = q.contiguous()
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    meta = dict(
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_N=BLOCK_N,
        IEEE=q.dtype == torch.float32,
    )
    if splits == 1:
        part, lse = out, out  # the split kernel writes the final output itself
    else:
        part = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _split_kernel[(batch, kv_heads, splits)](
        q, k_flat, v_flat, block_tables, lens, part, lse,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2) if splits > 1 else 0,
        lse.stride(0) if splits > 1 else 0, lse.stride(1) if splits > 1 else 0,
        scale, per_split, DIRECT=splits == 1, num_warps=4, num_stages=2, **meta,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(batch, heads)](
            part, lse, out,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), splits,
            SPLITS_PAD=triton.next_power_of_2(splits), D=head_dim,
            D_PAD=triton.next_power_of_2(head_dim), num_warps=4,
        )  # fmt: skip
    return out


VARLEN_ROWS = 64  # query rows (tokens x query heads of one KV head) per program


def varlen_programs(num_tokens: int, num_seqs: int, group: int) -> int:
    """Programs per KV head that cover any split of `num_tokens` into `num_seqs` runs."""
    block_q = VARLEN_ROWS // _group_pad(group)
    return num_tokens // block_q + num_seqs


def _group_pad(group: int) -> int:
    return max(1, triton.next_power_of_2(group)) if triton is not None else group


def paged_varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    programs: int | None = None,
) -> torch.Tensor:
    """Causal attention of query runs over their paged context.

    q: [T, H, D] (run s holds rows query_start[s]:query_start[s+1]); block_tables: [S, blocks];
    context_lens: [S], each run's context length after the step (its new tokens included,
    already written to the cache), so run s's i-th query sits at position
    context_lens[s] - run_length + i. Rows past query_start[S] are left as they are.
    `programs` fixes the launch shape (a graph captures it): at least
    `varlen_programs(T, S, group)`."""
    num_tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    group = heads // kv_heads
    group_pad = _group_pad(group)
    if programs is None:
        programs = varlen_programs(num_tokens, num_seqs, group)
    out = torch.empty_like(q)
    q = q.contiguous()
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    _varlen_kernel[(programs, kv_heads)](
        q, k_flat, v_flat, block_tables, query_start, context_lens, out,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), scale, num_seqs,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=VARLEN_ROWS // group_pad, D=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _attend_tile(
        q, K, V, table, t, t_ok, seen, kvh, d, d_ok, stride_kslot, stride_kh, scale,
        m_i, l_i, acc, BLOCK_SIZE: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Keys `t` (read through the block-table row `table`) into the online softmax of
        q's rows, `seen` masking scores: the new (row max, row sum, accumulator)."""
        block = tl.load(table + t // BLOCK_SIZE, mask=t_ok, other=0)
        rows = (block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * stride_kslot
        kv_mask = t_ok[:, None] & d_ok[None, :]
        offsets = rows[:, None] + kvh * stride_kh + d[None, :]
        k = tl.load(K + offsets, mask=kv_mask, other=0.0)
        if IEEE:  # noqa: SIM108 (a constexpr branch: one dot compiled, not a select)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(seen, scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offsets, mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _varlen_kernel(
        Q, K, V, Tables, QueryStart, ContextLens, Out,
        stride_qt, stride_qh, stride_kslot, stride_kh, stride_tb, stride_ot, stride_oh,
        scale, num_seqs,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        # Program p serves query block j of run s, where run s's blocks are numbered from
        # query_start[s] // BLOCK_Q + s (monotonic in s): binary search for s.
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        lo = pid * 0
        hi = pid * 0 + num_seqs - 1
        while lo < hi:  # the last run s with first_block(s) <= pid
            mid = (lo + hi + 1) // 2
            first = tl.load(QueryStart + mid).to(tl.int32) // BLOCK_Q + mid
            if first <= pid:
                lo = mid
            else:
                hi = mid - 1
        s = lo
        run_start = tl.load(QueryStart + s)
        run_end = tl.load(QueryStart + s + 1)
        tok0 = run_start + (pid - (run_start // BLOCK_Q + s)) * BLOCK_Q
        if tok0 < run_end:  # else a spare program (the grid covers any split of T)
            context = tl.load(ContextLens + s)
            offset = context - (run_end - run_start)  # position of the run's first query
            r = tl.arange(0, BLOCK_Q * GROUP_PAD)
            tok = tok0 + r // GROUP_PAD
            g = r % GROUP_PAD
            d = tl.arange(0, D_PAD)
            row_ok = (tok < run_end) & (g < GROUP)
            d_ok = d < D
            head = kvh * GROUP + g
            q = tl.load(
                Q + tok[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0,
            )  # fmt: skip
            # Rows past the run behave as its last query (their keys are all valid).
            q_pos = offset + tl.minimum(tok, run_end - 1) - run_start
            kv_end = tl.minimum(offset + tl.minimum(tok0 + BLOCK_Q, run_end) - run_start, context)
            m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
            acc = tl.zeros([BLOCK_Q * GROUP_PAD, D_PAD], dtype=tl.float32)
            for n0 in range(0, kv_end, BLOCK_N):
                t = n0 + tl.arange(0, BLOCK_N)
                t_ok = t < kv_end
                seen = t_ok[None, :] & (t[None, :] <= q_pos[:, None])  # key 0: seen by all rows
                m_i, l_i, acc = _attend_tile(
                    q, K, V, Tables + s * stride_tb, t, t_ok, seen, kvh, d, d_ok,
                    stride_kslot, stride_kh, scale, m_i, l_i, acc, BLOCK_SIZE, IEEE,
                )  # fmt: skip
            o = acc / l_i[:, None]
            tl.store(
                Out + tok[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh
                + d[None, :],
                o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
            )  # fmt: skip

    @triton.jit
    def _split_kernel(
        Q, K, V, Tables, Lens, Part, Lse,
        stride_qb, stride_qh, stride_kslot, stride_kh, stride_tb,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
        scale, per_split,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
        DIRECT: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(Lens + b)
        start = split * per_split
        end = tl.minimum(start + per_split, length)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        head = kvh * GROUP + g
        g_ok = g < GROUP
        d_ok = d < D
        q = tl.load(
            Q + b * stride_qb + head[:, None] * stride_qh + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            t_ok = t < end
            m_i, l_i, acc = _attend_tile(
                q, K, V, Tables + b * stride_tb, t, t_ok, t_ok[None, :], kvh, d, d_ok,
                stride_kslot, stride_kh, scale, m_i, l_i, acc, BLOCK_SIZE, IEEE,
            )  # fmt: skip
        has = l_i > 0.0
        o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        out_mask = g_ok[:, None] & d_ok[None, :]
        if DIRECT:
            offsets = b * stride_pb + head[:, None] * stride_ph + d[None, :]
            tl.store(Part + offsets, o.to(Part.dtype.element_ty), mask=out_mask)
        else:
            offsets = b * stride_pb + head[:, None] * stride_ph + split * stride_ps + d[None, :]
            tl.store(Part + offsets, o, mask=out_mask)
            lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(Lse + b * stride_lb + head * stride_lh + split, lse, mask=g_ok)

    @triton.jit
    def _combine_kernel(
        Part, Lse, Out,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
        splits,
        SPLITS_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D_PAD)
        s_ok = s < splits
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        weight = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - top), 0.0)
        parts = tl.load(
            Part + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
            mask=s_ok[:, None] & (d[None, :] < D), other=0.0,
        )  # fmt: skip
        o = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(Out + b * stride_ob + h * stride_oh + d, o.to(Out.dtype.element_ty), mask=d < D)

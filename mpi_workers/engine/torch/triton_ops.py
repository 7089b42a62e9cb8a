"""Fused elementwise layers for CUDA (Triton): one kernel each where PyTorch launches several.

Why: in a bf16 decode step on an H200 RMSNorm was 8 kernels, RoPE 4, SiLU·mul 2, plus the
residual adds: ~1.3 ms of a 7 ms batch-1 step and ~1,180 launches per step
(`shared/notes/gpu-engine-profile.md`). Each kernel here rounds to the model dtype where
HF's PyTorch code does (the residual sum, the normalised activations before the weight, SiLU
before the product), computing in float32 in between.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of x [rows, hidden]; with `residual`, first `residual += x` in place (the
    decoder's residual stream) and normalise that sum."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 256)),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor, split: int) -> torch.Tensor:
    """silu(gate_up[:, :split]) * gate_up[:, split:]."""
    rows = gate_up.shape[0]
    out = torch.empty(rows, split, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(split, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), split, BLOCK=block, num_warps=4
    )
    return out


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """RoPE of the q and k heads of the fused QKV output [tokens, heads + 2 kv_heads, dim]
    into a new [tokens, heads + kv_heads, dim] tensor, with the rotated K rows and the V
    rows written into the paged caches at `slots`: one launch where RoPE and the two cache
    index-copies took three (~150 us of a 5 ms batch-1 step on an H200, Llama-8B shape)."""
    tokens, _, dim = qkv.shape
    out = torch.empty(tokens, heads + kv_heads, dim, dtype=qkv.dtype, device=qkv.device)
    k_flat = k_cache.view(-1, kv_heads, dim)
    v_flat = v_cache.view(-1, kv_heads, dim)
    _rope_cache_kernel[(tokens, heads + 2 * kv_heads)](
        qkv, cos, sin_signed, out, k_flat, v_flat, slots,
        qkv.stride(0), qkv.stride(1), cos.stride(0), out.stride(0), out.stride(1),
        k_flat.stride(0), k_flat.stride(1),
        HEADS=heads, KV_HEADS=kv_heads, HALF=dim // 2, BLOCK=triton.next_power_of_2(dim // 2),
        num_warps=1,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(
        X, Cos, Sin, Out, KC, VC, Slots,
        stride_xt, stride_xh, stride_ct, stride_ot, stride_oh, stride_cs, stride_ch,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK)
        mask = d < HALF
        base = X + t * stride_xt + h * stride_xh
        x1 = tl.load(base + d, mask=mask, other=0.0)
        x2 = tl.load(base + HALF + d, mask=mask, other=0.0)
        slot = tl.load(Slots + t).to(tl.int64)
        if h < HEADS + KV_HEADS:  # a q or k head: rotate
            c1 = tl.load(Cos + t * stride_ct + d, mask=mask, other=0.0).to(tl.float32)
            c2 = tl.load(Cos + t * stride_ct + HALF + d, mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(Sin + t * stride_ct + d, mask=mask, other=0.0).to(tl.float32)
            s2 = tl.load(Sin + t * stride_ct + HALF + d, mask=mask, other=0.0).to(tl.float32)
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            o1 = (a * c1 + b * s1).to(Out.dtype.element_ty)
            o2 = (b * c2 + a * s2).to(Out.dtype.element_ty)
            dst = Out + t * stride_ot + h * stride_oh
            tl.store(dst + d, o1, mask=mask)
            tl.store(dst + HALF + d, o2, mask=mask)
            if h >= HEADS:  # a k head: also into the cache
                cache = KC + slot * stride_cs + (h - HEADS) * stride_ch
                tl.store(cache + d, o1, mask=mask)
                tl.store(cache + HALF + d, o2, mask=mask)
        else:  # a v head: into the cache as it is
            cache = VC + slot * stride_cs + (h - HEADS - KV_HEADS) * stride_ch
            tl.store(cache + d, x1, mask=mask)
            tl.store(cache + HALF + d, x2, mask=mask)

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Out, stride_x, stride_r, stride_o, hidden, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(R + row * stride_r + cols, x, mask=mask)
        s = x.to(tl.float32)
        var = tl.sum(s * s, 0) / hidden
        normed = (s * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
        w = tl.load(W + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
        tl.store(Out + row * stride_o + cols, out, mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, Out, stride_gu, stride_o, split, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < split
        g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0)
        u = tl.load(GU + row * stride_gu + split + cols, mask=mask, other=0.0)
        g32 = g.to(tl.float32)
        silu = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
        out = (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        tl.store(Out + row * stride_o + cols, out, mask=mask)

"""The linear layers of a one-row decode step on CUDA (Triton), with their neighbours fused in.

Why: at batch 1 a decode step is the time to read the weights once. cuBLAS reads them at
~0.93 of the copy bandwidth, but around its GEMMs each layer ran an RMSNorm (+ residual add)
kernel twice, a SiLU·mul kernel and two split-K reduce kernels: ~0.3 ms of kernels and ~1 µs
of launch gap each, of a 4.7 ms Llama-8B step on an H200 (`profile_gpu_decode.py`). Here one
kernel does each linear with what surrounds it:

- `NORM`: the input is the residual stream; each program computes its RMS (a 2 x hidden read
  from L2) and feeds the GEMV with the normalised row (QKV, gate/up);
- `GLU`: gate and up rows of the same outputs in one program, SiLU(gate)·up as the output;
- `RESIDUAL`: the output is added into the residual stream in place (O, down), so no reduce
  and no separate add.

Each program streams BLOCK_N whole weight rows along K (coalesced, no split-K) and keeps the
input row in registers. Every rounding follows HF's PyTorch layers (outputs of a linear,
the normalised row, SiLU, the residual sum are rounded to the model dtype where HF rounds
them), computing in float32 between.
"""

from __future__ import annotations

import torch

try:  # the device's torch ships Triton; CPU-only installs may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None


def blocks_for(n: int, k: int, glu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for an [n, k] weight (see benchmarks/bench_gpu_row.py)."""
    block_k = 512 if k >= 512 else triton.next_power_of_2(k)
    block_n = 8 if glu else 16
    return block_n, block_k, 4, 1


def row_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    glu_split: int | None = None,
    residual: torch.Tensor | None = None,
    blocks: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """One row `x` [1, K] times `weight` [N, K]^T (+ bias), with optional fusions:

    - `norm_weight`: x is first RMS-normalised (`eps`) and scaled by `norm_weight`;
    - `glu_split`: weight rows [0, split) are the gate, [split, 2 split) the up projection;
      the result is SiLU(gate)·up, [1, split];
    - `residual` [1, N]: the result is added into it in place and it is returned.

    `blocks`: (BLOCK_N, BLOCK_K, warps, stages) instead of `blocks_for`'s (for the tuning sweep).
    """
    rows, k = x.shape
    if rows != 1:
        raise ValueError(f"row_linear takes one row, got {rows}")
    n = glu_split if glu_split is not None else weight.shape[0]
    out = residual if residual is not None else x.new_empty(1, n)
    block_n, block_k, warps, stages = blocks or blocks_for(n, k, glu_split is not None)
    _row_linear_kernel[(triton.cdiv(n, block_n),)](
        x, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else x, out,
        n, k, weight.stride(0), glu_split or 0, eps,
        NORM=norm_weight is not None, GLU=glu_split is not None,
        RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _row_linear_kernel(
        X, NW, W, B, Y, N, K, stride_w, SPLIT, eps,
        NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        dt = X.dtype.element_ty
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        rstd = 1.0
        if NORM:
            squares = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                h = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
                squares += h * h
            rstd = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
        rows = W + n[:, None].to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(X + k, mask=k_ok, other=0.0)
            if NORM:
                normed = (x.to(tl.float32) * rstd).to(dt)
                scale = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)
                x = (scale * normed.to(tl.float32)).to(dt)
            xf = x.to(tl.float32)[None, :]
            mask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(rows + k[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * xf
            if GLU:
                u = tl.load(
                    rows + SPLIT * stride_w + k[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first",
                )  # fmt: skip
                acc_up += u.to(tl.float32) * xf
        out = tl.sum(acc, 1)
        if HAS_BIAS:
            out += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
        if GLU:
            up = tl.sum(acc_up, 1)
            if HAS_BIAS:
                up += tl.load(B + SPLIT + n, mask=n_ok, other=0.0).to(tl.float32)
            gate = out.to(dt).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dt)
            out = silu.to(tl.float32) * up.to(dt).to(tl.float32)
        if RESIDUAL:
            r = tl.load(Y + n, mask=n_ok, other=0.0).to(tl.float32)
            out = r + out.to(dt).to(tl.float32)
        tl.store(Y + n, out.to(Y.dtype.element_ty), mask=n_ok)

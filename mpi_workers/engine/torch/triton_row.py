"""The two residual-stream linears of a one-row decode step on CUDA (Triton), with what
surrounds them fused in.

Why: at batch 1 a decode step is the time to read the weights once. For the O and down
projections (K large against N) cuBLAS picks a split-K GEMM and a reduce kernel, and the
SiLU·mul before down is a kernel of its own: three extra kernels and their launch gaps per
layer, ~0.3 ms of a 4.7 ms Llama-8B step on an H200 (`benchmarks/profile_gpu_decode.py`).
Here each is one kernel:

- `residual`: the output is added into the residual stream in place (O, down), so no
  reduce and no separate add (the norm after it only normalises);
- `glu_input`: the input is the gate|up projection's output and the kernel computes
  SiLU(gate)·up as it reads it (down).

Each program streams BLOCK_N whole weight rows along K (coalesced, no split-K) and keeps the
input row in registers. Measured and left to cuBLAS: QKV and gate/up (N large against K;
cuBLAS reads them at 0.8-1.0 of the copy bandwidth, this kernel at 0.87-0.95 of cuBLAS even
with the RMSNorm fused in, `benchmarks/bench_gpu_row.py`). Roundings follow HF's PyTorch
layers (SiLU, its product, the linear's output and the residual sum rounded to the model
dtype), computing in float32 between.
"""

from __future__ import annotations

import torch

try:  # the device's torch ships Triton; CPU-only installs may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None


def blocks_for(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for an [n, k] weight: the winners of
    `benchmarks/bench_gpu_row.py --sweep` on an H200 (Llama-8B's O 1.23x cuBLAS, down
    1.02x; SmolLM2's 1.57x and 2.1x)."""
    if k >= 2 * n:  # down-like: long rows
        return 8, 2048, 8, 1
    return (16 if n >= 4096 else 8), 1024, 8, 1


def row_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    glu_input: bool = False,
    blocks: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """One row `x` [1, K] times `weight` [N, K]^T (+ bias), with optional fusions:

    - `glu_input`: x is [1, 2K], gate then up; the row multiplied is SiLU(gate)·up;
    - `residual` [1, N]: the result is added into it in place and it is returned.

    `blocks`: (BLOCK_N, BLOCK_K, warps, stages) instead of `blocks_for`'s (tuning sweep).
    """
    rows, width = x.shape
    n, k = weight.shape
    if rows != 1:
        raise ValueError(f"row_linear takes one row, got {rows}")
    if width != (2 * k if glu_input else k):
        raise ValueError(f"input width {width} does not fit a weight of {k} inputs")
    out = residual if residual is not None else x.new_empty(1, n)
    block_n, block_k, warps, stages = blocks or blocks_for(n, k)
    _row_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x, out, n, k, weight.stride(0),
        GLU_INPUT=glu_input, RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _row_linear_kernel(
        X, W, B, Y, N, K, stride_w,
        GLU_INPUT: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        dt = X.dtype.element_ty
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        rows = W + n[:, None].to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(X + k, mask=k_ok, other=0.0)
            if GLU_INPUT:
                gate = x.to(tl.float32)
                up = tl.load(X + K + k, mask=k_ok, other=0.0).to(tl.float32)
                silu = (gate / (1.0 + tl.exp(-gate))).to(dt)
                x = (silu.to(tl.float32) * up).to(dt)
            w = tl.load(
                rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                eviction_policy="evict_first",
            )  # fmt: skip
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, 1)
        if HAS_BIAS:
            out += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            r = tl.load(Y + n, mask=n_ok, other=0.0).to(tl.float32)
            out = r + out.to(dt).to(tl.float32)
        tl.store(Y + n, out.to(Y.dtype.element_ty), mask=n_ok)

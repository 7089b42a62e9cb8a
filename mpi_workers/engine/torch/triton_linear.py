"""Linear layers of decode steps with a few rows on CUDA (Triton): y = x W^T (+ b), x [M, K]
with M <= MAX_ROWS, W [N, K] as loaded.

Why: at batch 1 a decode step is the time to read the weights once, and cuBLAS's kernels for
[1, K] x [K, N] read the QKV and output projections of a Llama-8B layer at 0.76 and 0.69 of
the H200's copy bandwidth (plus a split-K reduce kernel each; `benchmarks/profile_gpu_decode.py`).
Here each program streams BLOCK_N full weight rows along K with coalesced loads and keeps the
few input rows in registers; the row block is padded to 16 only inside the tensor-core dot.
Block sizes are tuned per (N, K) on first use (before any graph capture: the engine warms
every graph up eagerly first).
"""

from __future__ import annotations

import os

import torch

try:  # the device's torch ships Triton; CPU-only installs may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None

MAX_ROWS = 16
# Row counts up to which the CUDA device path prefers this kernel to cuBLAS
# (benchmarks/bench_gpu_linear.py); HPCSERVE_TRITON_LINEAR_ROWS overrides it (0: off).
DEFAULT_ROWS = min(int(os.environ.get("HPCSERVE_TRITON_LINEAR_ROWS", "0")), MAX_ROWS)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) times weight [N, K]^T, plus bias [N]; in x's dtype."""
    rows, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _skinny_kernel[grid](
        x, weight, bias if bias is not None else x, out, rows, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    return out


if triton is not None:

    def _configs() -> list:
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bn in (16, 32, 64)
            for bk in (128, 256, 512)
            for warps, stages in ((4, 3), (4, 4), (8, 3))
        ]

    @triton.autotune(configs=_configs(), key=["N", "K", "IEEE"])
    @triton.jit
    def _skinny_kernel(
        X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, 16)
        n_ok = n < N
        m_ok = m < M
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(X + m[:, None] * stride_xm + k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            w = tl.load(W + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip

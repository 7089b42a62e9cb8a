"""Which implementation serves each layer call on this rank, chosen once when the model loads.

The torch engine has three implementations of the same calls: Triton kernels on CUDA (RMSNorm
with the residual add, RoPE with the K/V cache write, SiLU·mul, paged decode and varlen
attention, one-row linears with their norm, SiLU·mul or residual add fused in), our C kernels
for fp32 on AVX-512 CPUs (a skinny GEMM for decode rows, paged decode
attention, a whole decode step's layers in one call, row argmax), and plain PyTorch everywhere.
`choose()` decides from the device, dtype, head shape and TP size; the model, its layers, the
runner and the sampler read the answer and probe neither devices nor kernel libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mpi_workers.engine.torch import kernels, triton_attention, triton_ops
from mpi_workers.engine.torch.env_switches import env_flag

# (q, k_cache, v_cache, block_tables, lens, scale, max_len) -> attention output [B, H, D]
PagedDecode = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DevicePath:
    """The implementation of each call on one rank (see the module docstring)."""

    name: str  # cuda-triton, cuda-pytorch, cpu-kernels, cpu-pytorch: for logs
    # Weights as loaded ([out, in], `F.linear`: cuBLAS's best layout) or transposed and
    # packed for CPU matmuls (`pack_rows`: the row count MKL/oneDNN packings are made for).
    weights_as_loaded: bool
    pack_rows: int | None = None
    fused_layers: bool = False  # Triton norms, RoPE + K/V write, SiLU·mul
    row_linears: bool = False  # one-row steps: O and down in Triton (`triton_row`)
    paged_decode: PagedDecode | None = None  # decode attention reading the cache in place
    varlen_attention: bool = False  # prefill runs read the cache in place (Triton)
    skinny_linear: bool = False  # C GEMM for fp32 decode rows
    native_decode_layers: bool = False  # a whole fp32 decode step in one C call
    native_argmax: bool = False  # C row argmax of fp32 CPU logits


def choose(
    device: torch.device | str,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    tp_size: int = 1,
    pack_rows: int | None = 8,
) -> DevicePath:
    device = torch.device(device)
    if device.type == "cuda":
        if not triton_ops.available(device):
            return DevicePath("cuda-pytorch", weights_as_loaded=True)
        paged = triton_attention.supports(heads, kv_heads, head_dim)
        return DevicePath(
            "cuda-triton", weights_as_loaded=True, fused_layers=True,
            row_linears=tp_size == 1 and env_flag("HPCSERVE_ROW_LINEARS", True),
            paged_decode=triton_attention.paged_decode_attention if paged else None,
            varlen_attention=paged,
        )  # fmt: skip
    if not kernels.available():
        return DevicePath("cpu-pytorch", weights_as_loaded=False, pack_rows=pack_rows)
    fp32 = dtype == torch.float32
    decode = fp32 and kernels.decode_attention_supports(heads, kv_heads, head_dim)
    skinny = fp32 and bool(pack_rows)
    return DevicePath(
        "cpu-kernels", weights_as_loaded=False, pack_rows=pack_rows,
        paged_decode=_cpu_paged_decode if decode else None, skinny_linear=skinny,
        native_decode_layers=decode and skinny and tp_size == 1
        and kernels.decode_layers_enabled(),
        native_argmax=True,
    )  # fmt: skip


def _cpu_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    max_len: int,
) -> torch.Tensor:
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale)
    if out is None:  # the path was chosen for these shapes: only bad metadata gets here
        raise RuntimeError("decode attention refused the step's block tables or lengths")
    return out

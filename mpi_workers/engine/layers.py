"""Building blocks of the decoder that know how they are sharded under tensor parallelism.

Each linear layer declares whether it splits its output (column-parallel) or its input
(row-parallel) and carries a `weight_loader` that copies the right shard of a checkpoint
tensor. Only tp_size=1 runs today; sharding is the narrow() calls below plus an all-reduce
after row-parallel layers (`TpGroup.all_reduce`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TpGroup:
    """This rank's place in its tensor-parallel group; `all_reduce` sums row-parallel outputs."""

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1 or self.all_reduce is None:
            return x
        return self.all_reduce(x)


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(
        torch.ops.mkl, "_mkl_reorder_linear_weight"
    )


class InferenceWeight:
    """A frozen [out, in] weight laid out for fast CPU inference.

    Measured on 2 cores (fp32, SmolLM2 shapes): `x @ W_t` with W_t contiguous [in, out] beats
    `F.linear(x, W)` for one row, and MKL's packed GEMM (weights packed once for a row count
    of `pack_rows`) is ~2x faster again for small batches (2..pack_rows rows, zero-padded).
    """

    def __init__(self, weight: torch.Tensor, pack_rows: int | None) -> None:
        self.weight_t = weight.t().contiguous()
        self.pack_rows = pack_rows
        self.packed = None
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        if pack_rows and cpu_fp32 and mkl_packing_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, pack_rows)

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] view of the same storage (no copy)."""
        return self.weight_t.t()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.shape[0]
        if self.packed is not None and 1 < rows <= self.pack_rows:
            if rows < self.pack_rows:
                padded = x.new_zeros(self.pack_rows, x.shape[1])
                padded[:rows] = x
                x = padded
            out = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.pack_rows)
            out = out[:rows]
            return out + bias if bias is not None else out
        if bias is not None:
            return torch.addmm(bias, x, self.weight_t)
        return torch.mm(x, self.weight_t)


def _shard(weight: torch.Tensor, dim: int, tp: TpGroup) -> torch.Tensor:
    if tp.size == 1:
        return weight
    size = weight.shape[dim] // tp.size
    return weight.narrow(dim, tp.rank * size, size)


class _TpLinear(nn.Module):
    """y = x W^T (+ b); subclasses decide how W is split and loaded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TpGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)
        self.fast: InferenceWeight | None = None

    def prepare_inference(self, pack_rows: int | None) -> None:
        """Relayout the loaded weight for inference; the parameter keeps its values."""
        self.fast = InferenceWeight(self.weight.data, pack_rows)
        self.weight.data = self.fast.weight  # share storage: no second copy

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.matmul(x, self.bias)
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(_TpLinear):
    """Output features are split across ranks; no communication needed after it."""

    tp_style = "column"

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TpGroup) -> None:
        super().__init__(in_features, out_features // tp.size, bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        param.data.copy_(_shard(loaded, 0, self.tp))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (gate+up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TpGroup) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        index = int(shard_id)
        offset = sum(self.out_sizes[:index]) // self.tp.size
        size = self.out_sizes[index] // self.tp.size
        param.data.narrow(0, offset, size).copy_(_shard(loaded, 0, self.tp))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused into one matmul; heads are split across ranks."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TpGroup
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        out = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden, out, bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[
            shard_id
        ]
        param.data.narrow(0, offset, size).copy_(_shard(loaded, 0, self.tp))


class RowParallelLinear(_TpLinear):
    """Input features are split across ranks; partial outputs are summed (all-reduce)."""

    tp_style = "row"

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TpGroup) -> None:
        super().__init__(in_features // tp.size, out_features, bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        if param.dim() == 1:  # bias is added once, on rank 0
            param.data.copy_(loaded if self.tp.rank == 0 else torch.zeros_like(loaded))
        else:
            param.data.copy_(_shard(loaded, 1, self.tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None
        if self.fast is not None:
            return self.tp.reduce(self.fast.matmul(x, bias))
        return self.tp.reduce(F.linear(x, self.weight, bias))


class VocabEmbedding(nn.Module):
    """Token embedding; under TP the vocabulary would be split across ranks (not yet)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TpGroup) -> None:
        super().__init__()
        if tp.size != 1:
            raise NotImplementedError("vocab-parallel embedding is not implemented yet")
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, as HF Llama does (so fp32 outputs match)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse RoPE frequencies, with HF's "linear" and "llama3" scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {kind!r}")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; `lookup(positions)` once per step serves every layer."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        cos = self.cos.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.sin.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [tokens, heads, head_dim] (HF's non-interleaved layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

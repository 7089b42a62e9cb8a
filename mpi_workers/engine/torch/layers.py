"""Building blocks of the decoder that know how they are sharded under tensor parallelism.

Each linear layer declares whether it splits its output (column-parallel) or its input
(row-parallel) and carries a `weight_loader` that copies the right shard of a checkpoint
tensor. Sharding is the `narrow()` calls below (on a tensor or on a lazy safetensors slice,
so a rank reads only its shard) plus an all-reduce after row-parallel layers and the
vocab-parallel embedding, and a gather of the vocab-parallel logits (`TpGroup`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpi_workers.engine.torch import kernels, triton_ops
from mpi_workers.engine.torch.device_path import DevicePath
from mpi_workers.engine.torch.env_switches import env_flag


@dataclass(frozen=True)
class TpGroup:
    """This rank's place in its tensor-parallel group.

    `all_reduce` sums row-parallel outputs in place; `gather` concatenates each rank's last-dim
    slice on rank 0 (other ranks get None): only the leader samples, so only it needs logits.
    """

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    gather: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1 or self.all_reduce is None:
            return x
        return self.all_reduce(x)

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.size == 1 or self.gather is None:
            return x
        return self.gather(x)


def shape_of(loaded: Any) -> tuple[int, ...]:
    """Shape of a tensor or of a lazy safetensors slice (`safe_open(...).get_slice(name)`)."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """`loaded.narrow(dim, start, size)`; on a safetensors slice only that range is read."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = tuple([slice(None)] * dim + [slice(start, start + size)])
    return loaded[index]


def materialize(loaded: Any) -> torch.Tensor:
    """The whole tensor (a replicated parameter: every rank reads all of it)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def kv_head_range(num_kv_heads: int, tp: TpGroup) -> tuple[int, int]:
    """(first KV head, count) this rank holds: split when tp divides the KV heads, else each
    rank holds one head replicated over tp // num_kv_heads ranks (tp must be a multiple)."""
    if tp.size <= num_kv_heads:
        per_rank = num_kv_heads // tp.size
        return tp.rank * per_rank, per_rank
    replicas = tp.size // num_kv_heads
    return tp.rank // replicas, 1


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(
        torch.ops.mkl, "_mkl_reorder_linear_weight"
    )


def onednn_packing_available(dtype: torch.dtype) -> bool:
    """oneDNN prepacked linear for this low-precision dtype on this CPU (bf16: AVX512-BF16 or
    AMX; fp16: AVX512-FP16 or AMX-FP16). HPCSERVE_ONEDNN_LINEAR=0 turns it off."""
    if not env_flag("HPCSERVE_ONEDNN_LINEAR", True):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


class InferenceWeight:
    """A frozen [out, in] weight laid out for fast CPU inference.

    Measured on 2 cores (SmolLM2 shapes, see benchmarks/README.md):
    - fp32: for decode batches (1..32 rows) our AVX-512 kernel (`kernels.SkinnyWeight`, huge
      pages) is ~1.45x faster than MKL's packed GEMM at 8 rows, which is ~2x faster than
      `x @ W_t`, and as fast as `torch.mm` at one row; MKL's packing is the fallback where the
      kernel cannot be built. Prefill takes `x @ W_t` (W_t contiguous [in, out]: faster than
      `F.linear(x, W)`).
    - bf16/fp16: oneDNN's prepacked weight (`mkldnn._reorder_linear_weight`, the layout
      inductor's freezing pass uses; AMX where the CPU has it) is 1.2-3x faster than `x @ W_t`
      at every row count. The plain copy is dropped then: only the packed one is ever read.
    - GPU: the [out, in] weight as loaded, through `F.linear` (`x @ W_t` cost ~1 ms more per
      step at 128 rows on an H200, Llama-8B shape, bitwise-equal logits).
    """

    def __init__(self, weight: torch.Tensor, path: DevicePath) -> None:
        pack_rows = self.pack_rows = path.pack_rows
        self.skinny: kernels.SkinnyWeight | None = None  # our fp32 decode kernel
        self.packed: torch.Tensor | None = None  # MKL fp32 packing (fallback)
        self.onednn: torch.Tensor | None = None  # oneDNN low-precision packing
        self.weight_t: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        if path.weights_as_loaded:  # GPU: cuBLAS is fastest on the [out, in] layout (`F.linear`)
            self._weight = weight.contiguous()
            return
        if pack_rows and onednn_packing_available(weight.dtype):
            self.onednn = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), pack_rows)
            return
        self.weight_t = weight.t().contiguous()
        self._weight = self.weight_t.t()
        if not (pack_rows and weight.dtype == torch.float32):
            return
        if path.skinny_linear:
            self.skinny = kernels.SkinnyWeight(weight)
        elif mkl_packing_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, pack_rows)

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] weight (a view of the inference copy), or an empty tensor when
        only the oneDNN-packed layout is kept."""
        if self._weight is None:
            return torch.empty(0, dtype=self.onednn.dtype if self.onednn is not None else None)
        return self._weight

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, bias, "none", [], "")
        rows = x.shape[0]
        if self.skinny is not None and rows <= kernels.MAX_ROWS:
            out = self.skinny.matmul(x)
            return out.add_(bias) if bias is not None else out
        if self.packed is not None and 1 < rows <= self.pack_rows:
            if rows < self.pack_rows:
                padded = x.new_zeros(self.pack_rows, x.shape[1])
                padded[:rows] = x
                x = padded
            out = torch.ops.mkl._mkl_linear(x, self.packed, self._weight, None, self.pack_rows)
            out = out[:rows]
            return out + bias if bias is not None else out
        if self.weight_t is None:  # weights as loaded (GPU)
            return F.linear(x, self._weight, bias)
        if bias is not None:
            return torch.addmm(bias, x, self.weight_t)
        return torch.mm(x, self.weight_t)


def _shard(weight: Any, dim: int, tp: TpGroup) -> torch.Tensor:
    if tp.size == 1:
        return materialize(weight)
    size = shape_of(weight)[dim] // tp.size
    return narrow(weight, dim, tp.rank * size, size)


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

    def prepare_inference(self, path: DevicePath) -> None:
        """Relayout the loaded weight for inference; the parameter keeps its values."""
        self.fast = InferenceWeight(self.weight.data, path)
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
        self.kv_first, self.num_kv_heads = kv_head_range(num_kv_heads, tp)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[
            shard_id
        ]
        if shard_id == "q":
            shard = _shard(loaded, 0, self.tp)
        else:  # KV heads may be replicated (tp > KV heads): pick this rank's head range
            shard = narrow(loaded, 0, self.kv_first * self.head_dim, kv_size)
        param.data.narrow(0, offset, size).copy_(shard)


class RowParallelLinear(_TpLinear):
    """Input features are split across ranks; partial outputs are summed (all-reduce)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TpGroup) -> None:
        super().__init__(in_features // tp.size, out_features, bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        if param.dim() == 1:  # bias is added once, on rank 0
            if self.tp.rank == 0:
                param.data.copy_(materialize(loaded))
            else:
                param.data.zero_()
        else:
            param.data.copy_(_shard(loaded, 1, self.tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None
        if self.fast is not None:
            return self.tp.reduce(self.fast.matmul(x, bias))
        return self.tp.reduce(F.linear(x, self.weight, bias))


def vocab_shard(vocab_size: int, tp: TpGroup) -> tuple[int, int]:
    """(first row, rows) of this rank's vocabulary slice; the last slice may be padded."""
    per_rank = -(-vocab_size // tp.size)
    return tp.rank * per_rank, per_rank


def load_vocab_rows(param: torch.Tensor, loaded: Any, vocab_size: int, tp: TpGroup) -> None:
    """Copy this rank's vocabulary rows; padding rows (past the vocabulary) become zeros."""
    first, rows = vocab_shard(vocab_size, tp)
    real = max(0, min(rows, vocab_size - first))
    param.data.zero_()
    if real:
        param.data.narrow(0, 0, real).copy_(narrow(loaded, 0, first, real))


class VocabEmbedding(nn.Module):
    """Token embedding, vocabulary split across ranks: each rank looks up the ids it owns,
    zeros the others, and an all-reduce sums the rows (exactly one rank contributes each)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TpGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.first, rows = vocab_shard(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(rows, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        load_vocab_rows(param, loaded, self.vocab_size, self.tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.reduce(h)


class ParallelLMHead(ColumnParallelLinear):
    """The vocabulary projection, vocab split across ranks like `VocabEmbedding`;
    `logits()` gathers the slices on rank 0 and drops the padding columns."""

    def __init__(self, hidden: int, vocab_size: int, tp: TpGroup) -> None:
        self.vocab_size = vocab_size
        rows = vocab_shard(vocab_size, tp)[1]
        super().__init__(hidden, rows * tp.size, False, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        load_vocab_rows(param, loaded, self.vocab_size, self.tp)


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, as HF Llama does (so fp32 outputs match)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        # 0-dim tensors for the float32 path (buffers, so `.to(device)` moves them)
        self.register_buffer("_width", torch.tensor(float(hidden)), persistent=False)
        self.register_buffer("_eps", torch.tensor(eps), persistent=False)
        self.fused = False  # CUDA: one Triton kernel (set by the model at load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return triton_ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            # Bitwise the same as below (pow(2) is x*x, mean is sum then divide), in fewer
            # dispatches: no casts, and 0-dim tensors instead of Python scalars (each scalar
            # is wrapped and converted per call). ~1.5 ms of a 30 ms batch-1 decode step.
            var = (x * x).sum(-1, keepdim=True).div_(self._width)
            return self.weight * (x * var.add_(self._eps).rsqrt_())
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual += x` (in place), then the norm of it: one kernel when fused."""
        if self.fused:
            return triton_ops.rms_norm(x, self.weight, self.eps, residual)
        residual.add_(x)
        return self(residual)


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
        sin, half = emb.sin(), head_dim // 2
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer(
            "sin_signed", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False
        )

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos, signed sin) rows for `positions`, as `apply_rope` takes them."""
        cos = self.cos.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.sin_signed.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [tokens, heads, head_dim] (HF's non-interleaved layout).

    HF computes x*cos + cat(-x2, x1)*sin; with sin's first half negated once in the table,
    cat(x2, x1) is a flip of the two halves and the result is bitwise the same in fewer ops.
    """
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return swapped.mul_(sin_signed).add_(x * cos)

"""CPU kernels of our own, in C, built once per machine with the system compiler.

Only where the libraries fall short (figures in benchmarks/README.md):
- `skinny_gemm.c`: the fp32 GEMM of a decode step (1..MAX_ROWS rows), where MKL's packed GEMM
  streams the weights at ~2/3 of this kernel's speed at 8 rows; the packed weights sit on
  transparent huge pages (`huge_page_arena`);
- `paged_decode_attention.c`: decode attention read in place from the paged KV cache, where
  the PyTorch path copies every sequence's blocks out first (two index_selects per layer);
- `decode_layers.c`: all decoder layers of a decode step in one call (`DecodeLayers`), where
  PyTorch spends more on dispatching ~100 small ops per layer than on their arithmetic;
- `argmax.c`: greedy sampling's argmax, where torch's runs at ~1 GB/s.
The shared library is built on first use into `<cache>/kernels/` (keyed by the sources, the
compiler and its flags; built under a temporary name and renamed, so ranks building at once
never load half a file) and called through ctypes, which releases the GIL. Without a C
compiler, without AVX-512, or with HPCSERVE_CPU_KERNELS=0, `available()` is False and callers
keep the PyTorch/MKL paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from contract.config import cache_dir
from mpi_workers.engine.torch.env_switches import env_flag

logger = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("skinny_gemm.c", "paged_decode_attention.c", "decode_layers.c", "argmax.c")
]
HEADER = Path(__file__).with_name("vector_math.h")
# -mavx512f rather than -march=native: the cached file stays valid on any AVX-512 CPU
# (a shared home directory across node types), and the kernel needs nothing newer.
# -ffp-contract=off: the scalar code (norms, RoPE) rounds like PyTorch's separate mul and add.
FLAGS = ["-O3", "-mavx512f", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lmvec", "-lm"]  # libmvec: glibc's vector exp (vector_math.h)
# Decode batches up to this many rows take our kernels (8 at a time over each weight group
# while it sits in L2); measured faster than torch.mm up to 64 rows on 2 cores.
MAX_ROWS = 32
GROUP = 32  # output columns per packed group (skinny_gemm.c)


def enabled() -> bool:
    return env_flag("HPCSERVE_CPU_KERNELS", True)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    digest = hashlib.sha256(" ".join(FLAGS + LIBS).encode() + version.encode())
    for source in [*SOURCES, HEADER]:
        digest.update(source.read_bytes())
    target = cache_dir() / "kernels" / f"hpcserve_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), *LIBS],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on the kernels:\n{result.stderr[-2000:]}")
        os.replace(built, target)
    logger.info("built %s", target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (and why, logged once) where it cannot be used."""
    if not enabled():
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("CPU kernels off: this CPU has no AVX-512 (MKL path used)")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("CPU kernels off: no C compiler (cc/gcc) found (MKL path used)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU kernels off: %s", exc)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.hpcs_pack_weight.argtypes = [ptr, ptr, i64, i64]
    lib.hpcs_pack_weight.restype = None
    lib.hpcs_skinny_gemm.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.hpcs_skinny_gemm.restype = ctypes.c_int
    lib.hpcs_paged_decode_attention.argtypes = (
        [ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr] + [i64] * 6 + [ctypes.c_float, ctypes.c_int]
    )
    lib.hpcs_paged_decode_attention.restype = ctypes.c_int
    lib.hpcs_decode_scratch_floats.argtypes = [ptr, i64, i64]
    lib.hpcs_decode_scratch_floats.restype = i64
    lib.hpcs_decode_layers.argtypes = [ptr, i64, ptr, ptr, i64] + [ptr] * 5 + [i64, ptr, ptr]
    lib.hpcs_decode_layers.argtypes.append(ctypes.c_int)
    lib.hpcs_decode_layers.restype = ctypes.c_int
    lib.hpcs_argmax_rows.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.hpcs_argmax_rows.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def decode_attention_supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """The head shapes `paged_decode_attention.c` (and so `decode_layers.c`) takes."""
    return head_dim % 16 == 0 and head_dim <= 256 and heads % kv_heads == 0


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """`x.argmax(dim=-1)` of a 2-D float32 CPU tensor (same ties and NaN rule), ~20x faster at
    a vocabulary's width; None where the kernels are unavailable."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        return None  # checked first: GPU workers never build the library for this
    lib = _library()
    if lib is None:
        return None
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.hpcs_argmax_rows(
        x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads()
    )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """softmax(q K^T * scale) V for one query per sequence, K/V read in place.

    q: [batch, heads, head_dim] fp32; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [batch, max_blocks] int64; lengths: [batch] int64 (context incl. this token).
    None where the kernel does not handle the case (the caller takes the PyTorch path).
    """
    lib = _library()
    if lib is None or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return None
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    q = q.contiguous()
    max_len = block_tables.shape[1] * block_size
    out = torch.empty_like(q)
    scores = torch.empty(batch * heads * max_len, dtype=torch.float32)
    status = lib.hpcs_paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], lengths.data_ptr(), out.data_ptr(), scores.data_ptr(),
        batch, heads, kv_heads, head_dim, block_size, max_len, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out if status == 0 else None


class _HugePageArena:
    """Packed weights are carved from 2 MiB-aligned chunks advised for transparent huge pages.

    A decode step streams every weight once; with 4 KiB pages that stream pays a TLB miss per
    page, and the whole-model GEMM was 6-14 % slower (same-process A/B, benchmarks/README.md).
    Where THP is off (`never`) or madvise fails, the memory is just ordinary pages.
    """

    CHUNK = 64 << 20
    PAGE = 2 << 20

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self._madvise = getattr(ctypes.CDLL(None, use_errno=True), "madvise", None)
        if self._madvise is not None:
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def _new_chunk(self, nbytes: int) -> torch.Tensor:
        raw = torch.empty(nbytes + self.PAGE, dtype=torch.uint8)  # untouched: not resident yet
        start = -raw.data_ptr() % self.PAGE
        chunk = raw[start : start + nbytes]
        if self._madvise is not None:
            self._madvise(chunk.data_ptr(), nbytes, 14)  # MADV_HUGEPAGE; failure is harmless
        return chunk

    def take(self, floats: int) -> torch.Tensor:
        nbytes = -(-floats * 4 // 64) * 64
        if nbytes > self.CHUNK // 4:  # big weights get their own chunk
            return self._new_chunk(-(-nbytes // self.PAGE) * self.PAGE)[: floats * 4].view(
                torch.float32
            )
        if self._chunk is None or self._used + nbytes > self.CHUNK:
            self._chunk, self._used = self._new_chunk(self.CHUNK), 0
        piece = self._chunk[self._used : self._used + floats * 4].view(torch.float32)
        self._used += nbytes
        return piece


_arena: _HugePageArena | None = None


@contextlib.contextmanager
def huge_page_arena() -> Iterator[None]:
    """SkinnyWeights packed inside share huge-page chunks (one model's load); afterwards only
    the packed weights keep their chunks alive."""
    global _arena
    previous, _arena = _arena, _HugePageArena()
    try:
        yield
    finally:
        _arena = previous


class SkinnyWeight:
    """A float32 [out, in] weight packed for `skinny_gemm.c`; `matmul(x)` for 1..MAX_ROWS rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("the skinny GEMM kernel is not available on this machine")
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"SkinnyWeight takes a 2-D float32 CPU weight, got {weight.dtype}")
        self._lib = lib
        self.out_features, self.in_features = weight.shape
        groups = -(-self.out_features // GROUP)
        floats = groups * self.in_features * GROUP
        self.packed = _arena.take(floats) if _arena else torch.empty(floats, dtype=torch.float32)
        weight = weight.contiguous()
        lib.hpcs_pack_weight(
            weight.data_ptr(), self.packed.data_ptr(), self.out_features, self.in_features
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if not 1 <= rows <= MAX_ROWS or x.dtype != torch.float32:
            raise ValueError(f"skinny GEMM takes 1..{MAX_ROWS} float32 rows, got {rows}")
        x = x.contiguous()
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        self._lib.hpcs_skinny_gemm(
            x.data_ptr(), self.packed.data_ptr(), y.data_ptr(),
            rows, self.out_features, self.in_features, torch.get_num_threads(),
        )  # fmt: skip
        return y


def decode_layers_enabled() -> bool:
    """HPCSERVE_CPU_DECODE_LAYERS=0 keeps the per-op PyTorch decoder (A/B, debugging)."""
    return env_flag("HPCSERVE_CPU_DECODE_LAYERS", True) and available()


class _Layer(ctypes.Structure):
    _fields_: ClassVar = [
        (name, ctypes.c_void_p)
        for name in (
            "input_norm", "post_norm", "qkv", "qkv_bias", "o", "gate_up", "gate_up_bias",
            "down", "down_bias", "k_cache", "v_cache",
        )
    ]  # fmt: skip


class _Shape(ctypes.Structure):
    _fields_: ClassVar = [
        *((name, ctypes.c_int64) for name in (
            "hidden", "heads", "kv_heads", "head_dim", "intermediate", "block_size",
            "num_blocks", "max_positions",
        )),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]  # fmt: skip


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class DecodeLayers:
    """`decode_layers.c` over a loaded model's layers: `run()` replaces the decoder layers of a
    decode step of 1..MAX_ROWS rows (fp32, one rank). Weights are the layers' `SkinnyWeight`
    packings; the KV caches arrive with `bind_kv_cache` (the runner binds them after loading;
    until then every step is declined)."""

    def __init__(self, layers: list[Any], cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("the CPU kernels are not available on this machine")
        self._lib = lib
        self._layers = layers
        self.cos, self.sin_signed = cos.contiguous(), sin_signed.contiguous()
        attn = layers[0].self_attn
        mlp = layers[0].mlp
        self.shape = _Shape(
            hidden=attn.o_proj.fast.skinny.out_features,
            heads=attn.num_heads,
            kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            intermediate=mlp.split,
            max_positions=self.cos.shape[0],
            eps=layers[0].input_layernorm.eps,
            scale=attn.scale,
        )
        self._structs = (_Layer * len(layers))()
        for struct, layer in zip(self._structs, layers, strict=True):
            a, m = layer.self_attn, layer.mlp
            struct.input_norm = _ptr(layer.input_layernorm.weight)
            struct.post_norm = _ptr(layer.post_attention_layernorm.weight)
            struct.qkv, struct.qkv_bias = _ptr(a.qkv_proj.fast.skinny.packed), _ptr(a.qkv_proj.bias)
            struct.o = _ptr(a.o_proj.fast.skinny.packed)
            struct.gate_up = _ptr(m.gate_up_proj.fast.skinny.packed)
            struct.gate_up_bias = _ptr(m.gate_up_proj.bias)
            struct.down = _ptr(m.down_proj.fast.skinny.packed)
            struct.down_bias = _ptr(m.down_proj.bias)

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Each layer's [blocks, block_size, kv_heads, head_dim] caches (kept referenced)."""
        self._caches = (k_caches, v_caches)
        self.shape.num_blocks, self.shape.block_size = k_caches[0].shape[0], k_caches[0].shape[1]
        for struct, k, v in zip(self._structs, k_caches, v_caches, strict=True):
            struct.k_cache, struct.v_cache = _ptr(k), _ptr(v)

    @staticmethod
    def supports(layers: list[Any]) -> bool:
        """Every linear has its skinny packing, o_proj has no bias, heads fit the kernel."""
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
            if any(lin.fast is None or lin.fast.skinny is None for lin in linears):
                return False
            if a.o_proj.bias is not None:
                return False
            if not decode_attention_supports(a.num_heads, a.num_kv_heads, a.head_dim):
                return False
        return True

    def run(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
    ) -> bool:
        """Every layer on h [rows, hidden] in place; False (h untouched) if declined, also for
        metadata pointing outside the cache or the RoPE tables (the kernel checks it all)."""
        rows = h.shape[0]
        if not 1 <= rows <= MAX_ROWS or h.dtype != torch.float32 or not h.is_contiguous():
            return False
        max_len = block_tables.shape[1] * self.shape.block_size
        shape = ctypes.addressof(self.shape)
        floats = self._lib.hpcs_decode_scratch_floats(shape, rows, max_len)
        scratch = torch.empty(floats, dtype=torch.float32)
        status = self._lib.hpcs_decode_layers(
            ctypes.addressof(self._structs), len(self._layers), shape, h.data_ptr(), rows,
            self.cos.data_ptr(), self.sin_signed.data_ptr(), positions.data_ptr(),
            slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            lengths.data_ptr(), scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return status == 0

"""CPU kernels of our own, in C, built once per machine with the system compiler.

Only where the libraries fall short: `skinny_gemm.c` is the fp32 GEMM of a batched decode
step (2..8 rows), where MKL's packed GEMM streams the weights at ~2/3 of the speed this
kernel does (benchmarks/README.md). The shared library is built on first use into
`<cache>/kernels/` (keyed by the source, the compiler and its flags; built under a temporary
name and renamed, so ranks building at once never load half a file) and called through
ctypes, which releases the GIL. Without a C compiler, without AVX-512, or with
HPCSERVE_CPU_KERNELS=0, `skinny_gemm()` returns None and callers keep the MKL path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from contract.config import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny_gemm.c")
# -mavx512f rather than -march=native: the cached file stays valid on any AVX-512 CPU
# (a shared home directory across node types), and the kernel needs nothing newer.
FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 8
GROUP = 32  # output columns per packed group (skinny_gemm.c)


def enabled() -> bool:
    return os.environ.get("HPCSERVE_CPU_KERNELS", "1") not in ("0", "false", "no")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()
    ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"skinny_gemm-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(built)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr[-2000:]}")
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
    lib.hpcs_skinny_gemm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.hpcs_skinny_gemm.restype = ctypes.c_int
    return lib


def skinny_gemm_available() -> bool:
    return _library() is not None


class SkinnyWeight:
    """A float32 [out, in] weight packed for `skinny_gemm.c`; `matmul(x)` for 1..8 rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("the skinny GEMM kernel is not available on this machine")
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"SkinnyWeight takes a 2-D float32 CPU weight, got {weight.dtype}")
        self._lib = lib
        self.out_features, self.in_features = weight.shape
        groups = -(-self.out_features // GROUP)
        self.packed = torch.empty(groups * self.in_features * GROUP, dtype=torch.float32)
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
        scratch = torch.empty(self.in_features * MAX_ROWS, dtype=torch.float32)
        self._lib.hpcs_skinny_gemm(
            x.data_ptr(), self.packed.data_ptr(), y.data_ptr(), scratch.data_ptr(),
            rows, self.out_features, self.in_features, torch.get_num_threads(),
        )  # fmt: skip
        return y

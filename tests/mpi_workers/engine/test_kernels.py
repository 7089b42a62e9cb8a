"""Our C kernels (mpi_workers/engine/kernels): the skinny GEMM of batched decode steps.

Compared with a float64 reference on shapes that exercise the 32-column groups' tails, the
row counts 1..8, the build cache, and the MKL fallback when the kernels are turned off.
"""

from __future__ import annotations

import pytest
import torch

from mpi_workers.engine import kernels
from mpi_workers.engine.layers import InferenceWeight, mkl_packing_available

needs_kernel = pytest.mark.skipif(
    not kernels.skinny_gemm_available(), reason="no C compiler or no AVX-512 on this machine"
)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 5), (17, 64), (50, 33), (96, 576), (700, 129)])
@pytest.mark.parametrize("rows", range(1, 9))
def test_skinny_gemm_equals_matmul(rows: int, shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    got = kernels.SkinnyWeight(weight).matmul(x)
    expected = (x.double() @ weight.double().t()).float()
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_skinny_gemm_refuses_what_it_cannot_compute() -> None:
    skinny = kernels.SkinnyWeight(torch.randn(32, 16))
    with pytest.raises(ValueError, match=r"1\.\.8 float32 rows, got 9"):
        skinny.matmul(torch.randn(9, 16))
    with pytest.raises(ValueError, match="float32 rows"):
        skinny.matmul(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 CPU weight"):
        kernels.SkinnyWeight(torch.randn(32, 16).bfloat16())


@needs_kernel
def test_inference_weight_uses_the_kernel_for_small_batches() -> None:
    weight, bias = torch.randn(96, 64), torch.randn(96)
    fast = InferenceWeight(weight, pack_rows=8)
    assert fast.skinny is not None and fast.packed is None  # no MKL copy kept beside it
    for rows in (1, 2, 8, 40):  # 1 row and prefill use torch.mm on the plain copy
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fast.matmul(x, bias), x @ weight.t() + bias)


@pytest.mark.skipif(not mkl_packing_available(), reason="torch without MKL")
def test_turned_off_the_mkl_packing_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCSERVE_CPU_KERNELS", "0")
    kernels._library.cache_clear()
    try:
        weight = torch.randn(96, 64)
        fast = InferenceWeight(weight, pack_rows=8)
        assert fast.skinny is None and fast.packed is not None
        x = torch.randn(5, 64)
        torch.testing.assert_close(fast.matmul(x), x @ weight.t())
    finally:
        kernels._library.cache_clear()


@needs_kernel
def test_the_build_is_cached_per_source_and_compiler(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCSERVE_CACHE", str(tmp_path))
    compiler = kernels._compiler()
    assert compiler is not None
    built = kernels._build(compiler)
    assert built.parent == tmp_path / "kernels" and built.is_file()
    stamp = built.stat().st_mtime_ns
    assert kernels._build(compiler) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temp files left

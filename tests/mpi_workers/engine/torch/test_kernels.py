"""Our C kernels (mpi_workers/engine/torch/kernels): the skinny GEMM of batched decode steps and
decode attention read in place from the paged cache.

The GEMM against a float64 reference on shapes that exercise the 32-column groups' tails, the
row counts 1..8 and the 8-row chunks of larger batches; attention against SDPA over the
gathered blocks (lengths on and around block edges, GQA groups, shuffled block tables); the
build cache; the fallbacks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpi_workers.engine.torch import kernels
from mpi_workers.engine.torch.device_path import choose
from mpi_workers.engine.torch.layers import InferenceWeight, mkl_packing_available


def cpu_path(dtype: torch.dtype):
    """This machine's CPU path (C kernels where they build), packing for 8 rows."""
    return choose("cpu", dtype, heads=2, kv_heads=2, head_dim=16, pack_rows=8)

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no C compiler or no AVX-512 on this machine"
)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 5), (17, 64), (50, 33), (96, 576), (700, 129)])
@pytest.mark.parametrize("rows", [*range(1, 10), 16, 19, 32])
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
    with pytest.raises(ValueError, match=r"1\.\.32 float32 rows, got 33"):
        skinny.matmul(torch.randn(33, 16))
    with pytest.raises(ValueError, match="float32 rows"):
        skinny.matmul(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 CPU weight"):
        kernels.SkinnyWeight(torch.randn(32, 16).bfloat16())


@needs_kernel
def test_inference_weight_uses_the_kernel_for_decode_batches() -> None:
    weight, bias = torch.randn(96, 64), torch.randn(96)
    fast = InferenceWeight(weight, cpu_path(weight.dtype))
    assert fast.skinny is not None and fast.packed is None  # no MKL copy kept beside it
    for rows in (1, 2, 8, 20, 40):  # prefill (40 rows) uses torch.mm on the plain copy
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fast.matmul(x, bias), x @ weight.t() + bias)


@pytest.mark.skipif(not mkl_packing_available(), reason="torch without MKL")
def test_turned_off_the_mkl_packing_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCSERVE_CPU_KERNELS", "0")
    kernels._library.cache_clear()
    try:
        weight = torch.randn(96, 64)
        fast = InferenceWeight(weight, cpu_path(weight.dtype))
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


def _sdpa_reference(q, k_cache, v_cache, tables, lengths, scale) -> torch.Tensor:
    """The PyTorch path: gather each sequence's tokens, then plain SDPA per sequence."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    heads, head_dim = q.shape[1], q.shape[2]
    rows = []
    for b, length in enumerate(lengths.tolist()):
        tokens = torch.arange(length)
        blocks, offsets = tables[b, tokens // block_size], tokens % block_size
        k = k_cache[blocks, offsets].transpose(0, 1)  # [kv_heads, length, head_dim]
        v = v_cache[blocks, offsets].transpose(0, 1)
        query = q[b].view(kv_heads, heads // kv_heads, head_dim)
        rows.append(F.scaled_dot_product_attention(query, k, v, scale=scale).reshape(heads, -1))
    return torch.stack(rows)


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(9, 3, 64, 16), (4, 4, 128, 32), (8, 1, 16, 4)],
)
def test_paged_decode_attention_equals_sdpa(heads, kv_heads, head_dim, block_size) -> None:
    g = torch.Generator().manual_seed(heads * head_dim)
    lengths = torch.tensor([1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3])
    max_blocks = -(-int(lengths.max()) // block_size)
    num_blocks = len(lengths) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(lengths) * max_blocks]
    tables = tables.view(len(lengths), max_blocks).contiguous()
    q = torch.randn(len(lengths), heads, head_dim, generator=g)
    scale = head_dim**-0.5
    got = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lengths, scale)
    assert got is not None
    expected = _sdpa_reference(q, k_cache, v_cache, tables, lengths, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_paged_decode_attention_declines_what_it_does_not_handle() -> None:
    """None (the caller keeps the PyTorch path), never a wrong answer or a stray write."""
    tables, lengths = torch.zeros(1, 1, dtype=torch.long), torch.tensor([3])
    cache = torch.randn(2, 4, 1, 40)  # head_dim 40: not a multiple of 16
    assert (
        kernels.paged_decode_attention(torch.randn(1, 2, 40), cache, cache, tables, lengths, 1.0)
        is None
    )
    cache = torch.randn(2, 4, 1, 16)
    too_long = torch.tensor([5])  # more tokens than the table's one block of 4
    assert (
        kernels.paged_decode_attention(torch.randn(1, 2, 16), cache, cache, tables, too_long, 1.0)
        is None
    )
    bf16 = cache.bfloat16()
    assert (
        kernels.paged_decode_attention(
            torch.randn(1, 2, 16).bfloat16(), bf16, bf16, tables, lengths, 1.0
        )
        is None
    )


@needs_kernel
def test_weights_packed_in_an_arena_share_huge_page_chunks() -> None:
    weights = [torch.randn(96, 64), torch.randn(50, 33), torch.randn(2048, 2080)]
    with kernels.huge_page_arena():
        packed = [kernels.SkinnyWeight(w) for w in weights]
    first, second, big = (p.packed.data_ptr() for p in packed)
    assert first % (2 << 20) == 0 and second % 64 == 0  # chunk start, then 64-byte slices
    assert second - first == 3 * 64 * 32 * 4  # 96 outputs: three 32-column groups of k=64
    assert big % (2 << 20) == 0  # a weight over 16 MiB gets a chunk of its own
    for skinny, weight in zip(packed, weights, strict=True):
        x = torch.randn(3, weight.shape[1])
        torch.testing.assert_close(skinny.matmul(x), x @ weight.t(), rtol=1e-4, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("width", [1, 5, 16, 17, 49152])
def test_argmax_rows_equals_torch(width: int) -> None:
    g = torch.Generator().manual_seed(width)
    x = torch.randn(6, width, generator=g)
    x[1] = x[1, 0]  # all tied: the first index
    x[2] = float("-inf")
    if width > 3:
        x[3, width // 2] = x[3, -1] = float("inf")  # tied infinities
        x[4, 2] = x[4, 3] = float("nan")  # NaN is the maximum, the first one wins
    torch.testing.assert_close(kernels.argmax_rows(x), x.argmax(dim=-1), rtol=0, atol=0)
    assert kernels.argmax_rows(x.bfloat16()) is None  # the caller keeps torch's

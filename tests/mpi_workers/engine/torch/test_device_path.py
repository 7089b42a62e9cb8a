"""The device path: chosen once from device, dtype and shapes; the layers follow it."""

from __future__ import annotations

import pytest
import torch

from mpi_workers.engine.torch import kernels
from mpi_workers.engine.torch.device_path import choose
from mpi_workers.engine.torch.loader import load_model
from mpi_workers.engine.torch.model_config import load_model_config


def test_cpu_without_kernels_is_plain_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCSERVE_CPU_KERNELS", "0")
    kernels._library.cache_clear()
    try:
        path = choose("cpu", torch.float32, 8, 2, 64)
    finally:
        kernels._library.cache_clear()
    assert path.name == "cpu-pytorch" and not path.weights_as_loaded and path.pack_rows == 8
    assert path.paged_decode is None and not path.varlen_attention and not path.fused_layers
    assert not (path.skinny_linear or path.native_decode_layers or path.native_argmax)


@pytest.mark.skipif(not kernels.available(), reason="no C compiler or no AVX-512 here")
def test_cpu_kernels_serve_fp32_only_and_one_rank_decode_layers() -> None:
    fp32 = choose("cpu", torch.float32, 8, 2, 64)
    assert fp32.name == "cpu-kernels" and fp32.skinny_linear and fp32.paged_decode is not None
    assert fp32.native_decode_layers and fp32.native_argmax
    assert not choose("cpu", torch.float32, 8, 2, 64, tp_size=2).native_decode_layers
    bf16 = choose("cpu", torch.bfloat16, 8, 2, 64)
    assert bf16.paged_decode is None and not bf16.skinny_linear
    assert choose("cpu", torch.float32, 8, 2, 40).paged_decode is None  # head_dim % 16


def test_the_loaded_model_and_its_layers_follow_the_path(tiny_llama_dir) -> None:
    cfg = load_model_config(tiny_llama_dir)
    model = load_model(tiny_llama_dir, cfg, 64)
    assert model.path.name.startswith("cpu-")
    assert not any(getattr(m, "fused", False) for m in model.modules())  # no Triton on CPU
    linear = model.model.layers[0].self_attn.qkv_proj.fast
    assert linear is not None and linear.weight_t is not None  # transposed for CPU matmuls
    assert (linear.skinny is not None) == model.path.skinny_linear

"""bfloat16 on CPU: oneDNN-prepacked linear layers, and the real SmolLM2 run in bf16.

bf16 is an option on CPU (fp32 stays the default), for CPUs with AVX512-BF16 or AMX; greedy
bf16 tokens are not bitwise HF's (other GEMM kernels round differently), so the model test
compares logits with HF bf16 and with our own fp32 run.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from contract.messages import GenerateRequest, SamplingParams
from mpi_workers.engine.torch.device_path import choose
from mpi_workers.engine.torch.engine import TorchEngine
from mpi_workers.engine.torch.kv_cache import KvCache
from mpi_workers.engine.torch.layers import InferenceWeight, onednn_packing_available
from mpi_workers.engine.torch.loader import load_model
from mpi_workers.engine.torch.model_config import load_model_config
from mpi_workers.engine.torch.model_runner import ModelRunner, StepPlan


def cpu_path(dtype: torch.dtype):
    """This machine's CPU path (C kernels where they build), packing for 8 rows."""
    return choose("cpu", dtype, heads=2, kv_heads=2, head_dim=16, pack_rows=8)


needs_bf16 = pytest.mark.skipif(
    not onednn_packing_available(torch.bfloat16), reason="CPU without oneDNN bf16 support"
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_onednn_packed_linear_matches_plain_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    fast = InferenceWeight(weight, cpu_path(weight.dtype))
    assert fast.onednn is not None
    assert fast.weight.numel() == 0  # the plain copy is dropped: no second copy in memory
    expected = F.linear(x.float(), weight.float(), bias.float())
    got = fast.matmul(x, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), expected, atol=0.15, rtol=0.02)


def test_onednn_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCSERVE_ONEDNN_LINEAR", "0")
    assert not onednn_packing_available(torch.bfloat16)
    fast = InferenceWeight(torch.randn(8, 4).bfloat16(), cpu_path(torch.bfloat16))
    assert fast.onednn is None and fast.weight.shape == (8, 4)
    assert not onednn_packing_available(torch.float32)


def _prefill_logits(model_dir, dtype: torch.dtype, ids: list[int]) -> torch.Tensor:
    cfg = load_model_config(model_dir)
    model = load_model(model_dir, cfg, 512, dtype=dtype)
    cache = KvCache(cfg, 8, 16, dtype, "cpu")
    runner = ModelRunner(model, cache)
    table = list(range(-(-len(ids) // 16)))
    plan = StepPlan(
        input_ids=ids, positions=list(range(len(ids))), prefills=[(0, len(ids), 0, table)],
        sample_rows=list(range(len(ids))),
    )  # fmt: skip
    return runner.execute(plan).float()


@needs_bf16
@pytest.mark.model
def test_smollm_bf16_logits_track_hf_bf16_and_fp32(smol_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    text = "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level."
    ids = tokenizer(text)["input_ids"]
    ours_bf16 = _prefill_logits(smol_dir, torch.bfloat16, ids)
    ours_fp32 = _prefill_logits(smol_dir, torch.float32, ids)
    hf = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        hf_bf16 = hf(torch.tensor([ids])).logits[0].float()
    top_hf = hf_bf16.argmax(-1)
    agree_hf = (ours_bf16.argmax(-1) == top_hf).float().mean().item()
    agree_fp32 = (ours_bf16.argmax(-1) == ours_fp32.argmax(-1)).float().mean().item()
    assert agree_hf >= 0.9, agree_hf
    assert agree_fp32 >= 0.9, agree_fp32
    # bf16 keeps ~3 significant digits: logits (tens in size) stay within a few tenths.
    assert (ours_bf16 - hf_bf16).abs().mean().item() < 0.1
    assert (ours_bf16 - ours_fp32).abs().mean().item() < 0.3


@needs_bf16
@pytest.mark.model
def test_smollm_bf16_engine_answers(smol_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    async def run() -> list[int]:
        engine = TorchEngine(smol_dir, dtype=torch.bfloat16, num_blocks=64)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=16, temperature=0.0)
            req = GenerateRequest(request_id="bf16", token_ids=ids, sampling=params)
            return (await engine.generate_all(req)).token_ids
        finally:
            await engine.shutdown()

    assert "Paris" in tokenizer.decode(asyncio.run(run()))

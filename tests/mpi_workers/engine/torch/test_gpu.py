"""GPU paths of the torch engine (`pytest -m gpu` on a CUDA machine; skipped without CUDA).

The Triton paged decode and varlen attention against a float64 reference over random block
tables and ragged lengths; the engine on CUDA (CUDA graphs with the kernels, mixed
prefill + decode steps in graphs, and eager) token-identical to transformers in fp32 greedy,
with prefix-cache hits giving the same tokens as misses; logit_bias, min_tokens and output
constraints on CUDA; embeddings (pooled final hidden states) against transformers.
"""

from __future__ import annotations

import random

import pytest
import torch

from contract.messages import GenerateRequest, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def reference(q, k_cache, v_cache, tables, lens, scale):
    """float64 attention of each row over its context, gathered through its block table."""
    batch, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        blocks = tables[b, : -(-n // block_size)].cpu()
        k = k_cache[blocks].reshape(-1, kv_heads, dim)[:n].double().cpu()
        v = v_cache[blocks].reshape(-1, kv_heads, dim)[:n].double().cpu()
        for h in range(heads):
            scores = (k[:, h // group] @ q[b, h].double().cpu()) * scale
            out[b, h] = torch.softmax(scores, 0) @ v[:, h // group]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(32, 8, 128), (9, 3, 64), (4, 4, 80)])
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_paged_decode_attention_matches_float64(dtype, heads, kv_heads, dim, splits) -> None:
    from mpi_workers.engine.torch.triton_attention import paged_decode_attention

    torch.manual_seed(0)
    rng = random.Random(1)
    block_size, num_blocks, batch = 16, 96, 6
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, device="cuda").to(dtype)
    v_cache = torch.randn_like(k_cache)
    lens = [1, 15, 16, 17, 300, 777][:batch]
    max_blocks = -(-max(lens) // block_size)
    ids = list(range(num_blocks))
    tables = torch.zeros(batch, max_blocks, dtype=torch.long)
    for b, n in enumerate(lens):
        rng.shuffle(ids)
        tables[b, : -(-n // block_size)] = torch.tensor(ids[: -(-n // block_size)])
    q = torch.randn(batch, heads, dim, device="cuda").to(dtype)
    tables, lens_t = tables.cuda(), torch.tensor(lens, device="cuda")
    scale = dim**-0.5
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens_t, scale, max(lens), splits)
    ref = reference(q, k_cache, v_cache, tables, lens_t, scale)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.double().cpu(), ref, atol=tolerance, rtol=tolerance)


def varlen_reference(q, k_cache, v_cache, tables, query_start, context_lens, scale):
    """float64 causal attention of each query run over its paged context."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(len(context_lens)):
        a, b, n = int(query_start[s]), int(query_start[s + 1]), int(context_lens[s])
        for i in range(b - a):
            seen = n - (b - a) + i + 1
            row = torch.tensor([seen] * 1)
            out[a + i] = reference(q[a + i : a + i + 1], k_cache, v_cache, tables[s : s + 1],
                                   row, scale)[0]  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(32, 8, 128), (9, 3, 64), (4, 4, 80)])
def test_paged_varlen_attention_matches_float64(dtype, heads, kv_heads, dim) -> None:
    """Prefill runs with and without a cached prefix and decode rows (runs of one) in one
    launch, over shuffled blocks; padding runs and spare programs touch nothing."""
    from mpi_workers.engine.torch.triton_attention import (
        paged_varlen_attention,
        varlen_programs,
    )

    torch.manual_seed(0)
    block_size, num_blocks = 16, 96
    runs = [(7, 7), (1, 300), (40, 140), (1, 1), (64, 64), (3, 33), (0, 1)]  # (new, context)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(runs), 24, dtype=torch.long)
    for s, (_, context) in enumerate(runs):
        need = -(-context // block_size)
        tables[s, :need] = torch.tensor([order.pop() for _ in range(need)])
    starts = [0]
    for new, _ in runs:
        starts.append(starts[-1] + new)
    tokens = starts[-1] + 5  # rows past the last run stay untouched
    q = torch.randn(tokens, heads, dim, dtype=dtype, device="cuda")
    query_start = torch.tensor(starts, device="cuda")
    lens = torch.tensor([c for _, c in runs], device="cuda")
    scale = dim**-0.5
    programs = varlen_programs(tokens, len(runs), heads // kv_heads)
    out = paged_varlen_attention(q, k_cache, v_cache, tables.cuda(), query_start, lens, scale,
                                 programs)  # fmt: skip
    ref = varlen_reference(q, k_cache, v_cache, tables, query_start, lens, scale)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    used = starts[-1]
    assert torch.allclose(out[:used].double().cpu(), ref[:used], atol=tolerance, rtol=tolerance)


def transformers_greedy(model_dir, prompts, new_tokens: int = 16) -> list[list[int]]:
    """transformers' fp32 greedy continuation of each prompt on the GPU."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device="cuda")
            out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False)  # fmt: skip
            expected.append(out[0, len(prompt) :].tolist())
    return expected


def _requests(prompts, **sampling):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, **sampling)
    return [GenerateRequest(request_id=f"r{i}", token_ids=p, sampling=params)
            for i, p in enumerate(prompts)]  # fmt: skip


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("eager", [False, True])
def test_engine_on_cuda_matches_transformers_greedy(tiny_llama_dir, eager, overlap) -> None:
    """(A plain test running its own loop: the GPU machine has no pytest-asyncio.)"""
    import asyncio

    from mpi_workers.engine.torch.engine import TorchEngine

    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 64)]
    expected = transformers_greedy(tiny_llama_dir, prompts)
    engine = TorchEngine(
        tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16, num_blocks=64,
        enforce_eager=eager, overlap=overlap,
    )  # fmt: skip
    assert engine.model.path.name == "cuda-triton"
    assert engine.runner.decode_attention is not None  # the Triton kernel serves decode
    assert engine.overlap is overlap

    async def serve() -> None:
        await engine.start()
        try:
            outs = await asyncio.gather(*(engine.generate_all(r) for r in _requests(prompts)))
            assert [o.token_ids for o in outs] == expected
            # the same prompts again: prefix-cache hits, same tokens
            again = await asyncio.gather(*(engine.generate_all(r) for r in _requests(prompts)))
            assert [o.token_ids for o in again] == expected
            assert any(o.num_cached_tokens for o in again)
        finally:
            await engine.shutdown()

    asyncio.run(serve())


def test_mixed_steps_replay_graphs_and_match_transformers(tiny_llama_dir) -> None:
    """Chunked prefill (20 tokens a step) beside decode rows: mixed steps run in CUDA graphs
    (the varlen kernel, K/V read in place) and the tokens equal transformers' fp32 greedy."""
    import asyncio

    from mpi_workers.engine.torch.engine import TorchEngine

    prompts = [list(range(7, 7 + n)) for n in (5, 45, 33, 70, 12)]
    expected = transformers_greedy(tiny_llama_dir, prompts)
    engine = TorchEngine(
        tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16, num_blocks=96,
        max_num_batched_tokens=20,
    )  # fmt: skip

    async def serve() -> None:
        await engine.start()
        try:
            # 20 tokens a step: the short prompts decode while the long ones still prefill
            outs = await asyncio.gather(*(engine.generate_all(r) for r in _requests(prompts)))
            assert [o.token_ids for o in outs] == expected
        finally:
            await engine.shutdown()

    asyncio.run(serve())
    assert engine.runner.graphs is not None and engine.runner.graphs.mixed


def test_prompt_logprobs_on_cuda_match_transformers(tiny_llama_dir) -> None:
    """Prompt logprobs on the GPU (overlapped scheduling and CUDA graphs on: the steps with
    prompt rows run eagerly and synchronously), chunked prefill of 20 tokens beside decode
    rows, then again with the prefix cached: transformers' fp32 log_softmax at each position."""
    import asyncio

    from transformers import AutoModelForCausalLM

    from mpi_workers.engine.torch.engine import TorchEngine

    prompts = [list(range(7, 7 + n)) for n in (45, 70)]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).cuda().eval()
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            logprobs = hf(torch.tensor([prompt], device="cuda")).logits[0].log_softmax(-1)
            index = torch.tensor(prompt[1:], device="cuda").unsqueeze(1)
            expected.append(logprobs[:-1].gather(1, index).squeeze(1).cpu())
    del hf
    engine = TorchEngine(
        tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16, num_blocks=96,
        max_num_batched_tokens=20,
    )  # fmt: skip
    assert engine.overlap and engine.runner.graphs is not None

    async def serve() -> None:
        await engine.start()
        try:
            for _ in range(2):  # the second round: the prompts' blocks are cached (not read)
                plain = _requests([list(range(3, 30))])[0].model_copy(update={"request_id": "x"})
                wanting = _requests(prompts, prompt_logprobs=2)
                outs = await asyncio.gather(
                    *(engine.generate_all(r) for r in [plain, *wanting])
                )
                for out, want in zip(outs[1:], expected, strict=True):
                    assert out.prompt_logprobs is not None and out.num_cached_tokens == 0
                    got = torch.tensor([e.logprob for e in out.prompt_logprobs])
                    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
                    assert all(len(e.top) == 2 for e in out.prompt_logprobs)
        finally:
            await engine.shutdown()

    asyncio.run(serve())


def test_sampling_on_cuda_seeded_and_unseeded(tiny_llama_dir) -> None:
    """Temperature sampling on the GPU: unseeded rows draw on the device (and overlap), a
    seeded request gives the same tokens with and without overlap."""
    import asyncio

    from mpi_workers.engine.torch.engine import TorchEngine

    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 64)]

    def seeded():  # outlives the others: every step of the mixed run has its row
        request = _requests(prompts[:1], seed=11)[0]
        request.sampling.temperature = 0.8
        request.sampling.max_tokens = 64
        return [request]

    def unseeded():
        requests = _requests(prompts[1:], top_p=0.9)
        for request in requests:
            request.sampling.temperature = 1.0
            request.request_id = f"u-{request.request_id}"
        return requests

    def run(overlap: bool, requests):
        engine = TorchEngine(tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16,
                             num_blocks=64, overlap=overlap)  # fmt: skip

        async def serve():
            await engine.start()
            try:
                return await asyncio.gather(*(engine.generate_all(r) for r in requests))
            finally:
                await engine.shutdown()

        return asyncio.run(serve()), engine

    alone, _ = run(False, seeded())
    again, _ = run(True, seeded())
    assert again[0].token_ids == alone[0].token_ids
    mixed, engine = run(True, seeded() + unseeded())
    assert [len(o.token_ids) for o in mixed] == [64, 16, 16, 16]
    assert all(o.finish_reason == "length" for o in mixed)
    assert engine.stats.num_overlapped_steps == 0  # the seeded row keeps steps synchronous
    drawn, engine = run(True, unseeded())
    assert all(len(o.token_ids) == 16 for o in drawn)
    assert engine.stats.num_overlapped_steps > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_match_the_pytorch_layers(dtype) -> None:
    import torch.nn.functional as F

    from mpi_workers.engine.torch import triton_ops
    from mpi_workers.engine.torch.layers import RMSNorm, RotaryEmbedding, apply_rope

    torch.manual_seed(0)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    norm = RMSNorm(4096, 1e-5).cuda().to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(7, 4096, device="cuda").to(dtype)
    residual = torch.randn_like(x)
    assert torch.allclose(triton_ops.rms_norm(x, norm.weight, 1e-5), norm(x), **tolerance)
    fused_residual = residual.clone()
    out = triton_ops.rms_norm(x, norm.weight, 1e-5, fused_residual)
    assert torch.equal(fused_residual, residual + x)  # the residual stream, in place
    assert torch.allclose(out, norm(residual + x), **tolerance)

    gate_up = torch.randn(5, 2 * 1536, device="cuda").to(dtype)
    expected = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    assert torch.allclose(triton_ops.silu_mul(gate_up, 1536), expected, **tolerance)

    rotary = RotaryEmbedding(128, 64, 500000.0, None).cuda()
    positions = torch.tensor([0, 3, 17, 63], device="cuda")
    cos, sin = rotary.lookup(positions, dtype)
    qkv = torch.randn(4, 32 + 2 * 8, 128, device="cuda").to(dtype)
    expected = apply_rope(qkv[:, : 32 + 8].clone(), cos, sin)
    k_cache = torch.zeros(6, 16, 8, 128, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, 17, 40, 95], device="cuda")  # any cache slots
    qk = triton_ops.rope_and_cache(qkv, cos, sin, k_cache, v_cache, slots, 32, 8)
    assert torch.allclose(qk, expected, **tolerance)
    assert torch.equal(k_cache.view(-1, 8, 128)[slots], qk[:, 32:])  # the rotated K rows
    assert torch.equal(v_cache.view(-1, 8, 128)[slots], qkv[:, 40:])  # V as it is
    others = torch.ones(96, dtype=torch.bool, device="cuda")
    others[slots] = False
    assert not k_cache.view(-1, 8, 128)[others].any() and not v_cache.view(-1, 8, 128)[others].any()


def test_gpu_kv_pool_is_sized_from_free_memory(tiny_llama_dir) -> None:
    from mpi_workers.engine.torch.engine import TorchEngine
    from mpi_workers.engine.torch.kv_cache import GPU_RESERVE_BYTES, bytes_per_block

    free, total = torch.cuda.mem_get_info()
    utilization = (GPU_RESERVE_BYTES + 2**30) / total  # leaves ~1 GiB for the pool
    engine = TorchEngine(tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16,
                         gpu_memory_utilization=utilization)  # fmt: skip
    pool = engine.kv_cache.num_blocks * bytes_per_block(engine.config, 16, torch.float32)
    expected = min(int(utilization * total), free) - GPU_RESERVE_BYTES  # tiny weights: ~0
    assert 0.97 * expected < pool <= expected
    del engine
    torch.cuda.empty_cache()
    with pytest.raises(ValueError, match=r"engine\.gpu_memory_utilization"):
        TorchEngine(tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16,
                    gpu_memory_utilization=0.01)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (37, 200), (576, 1536), (1000, 14336)])
def test_row_linears_match_the_pytorch_layers(dtype, n, k) -> None:
    """Each fusion of `triton_row.row_linear` against the layers it replaces (ragged sizes:
    blocks that overhang N and K; K 14336 takes the long-K blocks)."""
    import torch.nn.functional as F

    from mpi_workers.engine.torch import triton_row

    torch.manual_seed(0)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    h = torch.randn(1, k, device="cuda").to(dtype)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)

    def close(actual, expected) -> None:
        torch.testing.assert_close(actual, expected, **tolerance)

    close(triton_row.row_linear(h, weight), F.linear(h, weight))
    close(triton_row.row_linear(h, weight, bias), F.linear(h, weight, bias))
    residual = torch.randn(1, n, device="cuda").to(dtype)
    expected = residual + F.linear(h, weight, bias)
    out = triton_row.row_linear(h, weight, bias, residual=residual)
    assert out is residual  # the residual stream, updated in place
    close(residual, expected)
    gate_up = torch.randn(1, 2 * k, device="cuda").to(dtype)
    act = F.silu(gate_up[:, :k]) * gate_up[:, k:]  # HF's MLP: both rounded to the dtype
    close(triton_row.row_linear(gate_up, weight, glu_input=True), F.linear(act, weight))
    residual = torch.randn(1, n, device="cuda").to(dtype)
    expected = residual + F.linear(act, weight, bias)
    triton_row.row_linear(gate_up, weight, bias, residual=residual, glu_input=True)
    close(residual, expected)
    with pytest.raises(ValueError, match="one row"):
        triton_row.row_linear(torch.ones(2, k, device="cuda", dtype=dtype), weight)
    with pytest.raises(ValueError, match="does not fit"):
        triton_row.row_linear(h, weight, glu_input=True)


@pytest.mark.parametrize("eager", [False, True])
def test_one_row_steps_match_transformers_greedy(tiny_llama_dir, eager) -> None:
    """A lone sequence decodes one row per step: the fused row linears serve every layer
    (graph and eager), token-identical to transformers in fp32."""
    import asyncio

    from mpi_workers.engine.torch import triton_row
    from mpi_workers.engine.torch.engine import TorchEngine

    prompts = [list(range(7, 7 + 29))]
    expected = transformers_greedy(tiny_llama_dir, prompts)
    engine = TorchEngine(
        tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16, num_blocks=64,
        enforce_eager=eager,
    )  # fmt: skip
    assert engine.model.path.row_linears
    calls = 0
    original = triton_row.row_linear

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    async def serve() -> list[list[int]]:
        await engine.start()
        try:
            outs = await asyncio.gather(*(engine.generate_all(r) for r in _requests(prompts)))
            return [o.token_ids for o in outs]
        finally:
            await engine.shutdown()

    triton_row.row_linear = counting
    try:
        assert asyncio.run(serve()) == expected
    finally:
        triton_row.row_linear = original
    assert calls > 0  # eager: every one-row step; graphs: at capture


def test_logit_bias_and_min_tokens_on_cuda(tiny_llama_dir) -> None:
    """The sampler's logit_bias and min_tokens mask on CUDA logits equal the CPU's; in the
    engine on CUDA with overlapped scheduling, rows that need them keep their steps
    synchronous and get them (+100 on a token: that token every step; min_tokens: no stop
    id before it), while a plain row beside them stays transformers' greedy."""
    import asyncio

    from mpi_workers.engine.torch.engine import TorchEngine
    from mpi_workers.engine.torch.sampler import SampleRow, apply_logit_rules

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [
        SampleRow(SamplingParams(logit_bias={3: 2.5, 7: -100.0}), [1, 2], 2),
        SampleRow(SamplingParams(min_tokens=4, stop_token_ids=[9]), [1, 2, 5], 2),
        SampleRow(SamplingParams(), [1], 1),
    ]
    on_cpu = apply_logit_rules(logits, rows, frozenset({0}))
    on_gpu = apply_logit_rules(logits.cuda(), rows, frozenset({0}))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)

    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40)]
    expected = transformers_greedy(tiny_llama_dir, prompts)
    forced, stop = expected[1][0] + 1, expected[2][2]
    plain = _requests(prompts[:1])[0]
    biased = _requests(prompts[1:2], logit_bias={forced: 100.0})[0]
    held = _requests(prompts[2:3], min_tokens=8, stop_token_ids=[stop])[0]
    biased.request_id, held.request_id = "biased", "held"
    engine = TorchEngine(tiny_llama_dir, device="cuda", dtype=torch.float32, block_size=16,
                         num_blocks=64, overlap=True)  # fmt: skip

    async def serve():
        await engine.start()
        try:
            return await asyncio.gather(*(engine.generate_all(r) for r in (plain, biased, held)))
        finally:
            await engine.shutdown()

    outs = asyncio.run(serve())
    assert outs[0].token_ids == expected[0]
    assert outs[1].token_ids == [forced] * 16
    assert len(outs[2].token_ids) >= 8 and stop not in outs[2].token_ids[:8]
    assert engine.stats.num_overlapped_steps == 0  # the biased row is in every step


def test_constrained_output_on_cuda(tiny_model_writer, tmp_path) -> None:
    """The constraint's bitmask applied on CUDA logits equals the CPU's; in the engine on
    CUDA with overlapped scheduling and CUDA graphs, random-weight rows under a regex and a
    JSON Schema (greedy and temperature 1) end "stop" with text the constraint accepts,
    while a plain row beside them runs on as before."""
    import asyncio
    import json
    import re
    import shutil

    from contract.config import default_model_dir
    from contract.messages import GuidedDecoding
    from mpi_workers.engine.torch.engine import TorchEngine
    from mpi_workers.engine.torch.guided import apply_bitmask

    tokenizer_json = default_model_dir() / "tokenizer.json"
    if not tokenizer_json.is_file():
        pytest.skip(f"needs the default model's tokenizer ({tokenizer_json})")
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0))
    mask = torch.randint(-(2**31), 2**31 - 1, (2, 1536), dtype=torch.int32)
    on_cpu = apply_bitmask(logits, [0, 2], mask)
    on_gpu = apply_bitmask(logits.cuda(), [0, 2], mask.pin_memory())
    assert torch.equal(on_gpu.cpu(), on_cpu)

    folder = tiny_model_writer(tmp_path / "tiny", "llama", vocab_size=49152)
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    from tokenizers import Tokenizer

    decode = Tokenizer.from_file(str(tokenizer_json)).decode
    schema = {"type": "object", "additionalProperties": False, "required": ["k", "n"],
              "properties": {"k": {"enum": ["alpha", "beta"]},
                             "n": {"type": "integer", "minimum": 0, "maximum": 99}}}  # fmt: skip
    regex = GuidedDecoding(kind="regex", spec="(yes|no)-[0-9]{2}")
    as_json = GuidedDecoding(kind="json_schema", spec=json.dumps(schema))

    def req(rid: str, guided: GuidedDecoding | None, temperature: float) -> GenerateRequest:
        sampling = SamplingParams(max_tokens=40, temperature=temperature, guided=guided,
                                  stop_token_ids=[2], ignore_eos=guided is None)  # fmt: skip
        return GenerateRequest(request_id=rid, token_ids=[5, 6, 7, 8], sampling=sampling)

    requests = [req("plain", None, 0.0), req("re0", regex, 0.0), req("re1", regex, 1.0),
                req("js0", as_json, 0.0), req("js1", as_json, 1.0)]  # fmt: skip
    engine = TorchEngine(folder, device="cuda", dtype=torch.float32, block_size=16,
                         num_blocks=64, overlap=True)  # fmt: skip

    async def serve():
        await engine.start()
        try:
            alone = await engine.generate_all(req("alone", None, 0.0))
            return alone, await asyncio.gather(*(engine.generate_all(r) for r in requests))
        finally:
            await engine.shutdown()

    alone, outs = asyncio.run(serve())
    assert outs[0].token_ids == alone.token_ids and len(alone.token_ids) == 40
    for out in outs[1:3]:
        assert out.finish_reason == "stop"
        assert re.fullmatch(r"(yes|no)-[0-9]{2}", decode(out.token_ids))
    for out in outs[3:]:
        value = json.loads(decode(out.token_ids))
        assert out.finish_reason == "stop" and value["k"] in ("alpha", "beta")
        assert set(value) == {"k", "n"} and 0 <= value["n"] <= 99


def _embedding_check(model_dir, device: str, dtype: torch.dtype, atol: float) -> None:
    """Embeddings (LAST and MEAN) of prompts over several 20-token prefill chunks, beside a
    generation decoding, twice (the second round: LAST reads the cached prefix): each equals
    transformers' `AutoModel(ids).last_hidden_state` pooled and normalized (fp32 reference):
    cosine above 1 - `atol`, no component off by 10 x `atol`."""
    import asyncio

    from transformers import AutoModel

    from contract.messages import PoolingParams, decode_embedding
    from mpi_workers.engine.torch.engine import TorchEngine

    prompts = [list(range(7, 7 + n)) for n in (5, 45, 70)]
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    with torch.inference_mode():
        states = [hf(torch.tensor([p], device=device)).last_hidden_state[0].cpu() for p in prompts]
    del hf
    expected = {
        "LAST": [torch.nn.functional.normalize(s[-1], dim=0) for s in states],
        "MEAN": [torch.nn.functional.normalize(s.mean(0), dim=0) for s in states],
    }
    engine = TorchEngine(
        model_dir, device=device, dtype=dtype, block_size=16, num_blocks=96,
        max_num_batched_tokens=20,
    )  # fmt: skip

    def embed(kind: str) -> list[GenerateRequest]:
        return [GenerateRequest(request_id=f"{kind}{i}-{id(p)}", token_ids=p,
                                pooling=PoolingParams(pooling_type=kind))
                for i, p in enumerate(prompts)]  # fmt: skip

    async def serve() -> None:
        await engine.start()
        try:
            for round_ in range(2):
                generation = _requests([list(range(3, 30))])[0]
                generation.request_id = f"gen{round_}"
                outs = await asyncio.gather(
                    *(engine.generate_all(r) for r in [generation, *embed("LAST"), *embed("MEAN")])
                )
                assert len(outs[0].token_ids) == 16
                for kind, got_outs in (("LAST", outs[1:4]), ("MEAN", outs[4:7])):
                    for out, want in zip(got_outs, expected[kind], strict=True):
                        assert out.embedding is not None and out.token_ids == []
                        got = torch.tensor(decode_embedding(out.embedding))
                        cosine = float(got @ want)  # both unit vectors
                        assert cosine > 1 - atol and (got - want).abs().max() < 10 * atol, (
                            cosine, (got - want).abs().max())  # fmt: skip
        finally:
            await engine.shutdown()

    asyncio.run(serve())


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_embeddings_on_cuda_match_transformers(tiny_llama_dir, dtype, atol) -> None:
    """Embeddings on the GPU with overlapped scheduling and CUDA graphs on (mixed prefill +
    decode steps replay graphs; the pooled rows are read from the graph's output)."""
    _embedding_check(tiny_llama_dir, "cuda", dtype, atol)

"""The torch engine on one GPU through its real `generate` path (scheduler, sampler, streams).

Random weights (written once to a safetensors folder, no download), greedy, EOS ignored,
prompts of --prompt tokens, --new-tokens generated. Measured: the decode step at batch 1
(time after the first token / tokens after it), batch-128 decode throughput (tokens after the
last request's first token / the time since), and batch-128 end to end (prefill included).
Each figure is taken with synchronous stepping and with overlapped scheduling on the same
engine, and against a minimal hand-written reference loop (contiguous KV, one CUDA graph)
run in the same process. A busy-server case: the same 128 requests with a 512-token step
budget, so most steps mix prefill chunks with decode rows, with mixed-step CUDA graphs on and
off (eager) on the same engine. The last line: `gpu_engine bs1_roofline=<x> bs128_tok_s=<y>
e2e_bs128_tok_s=<z> vs_reference_bs128=<r>`.

    python3 benchmarks/bench_gpu_engine.py --shape llama8b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.messages import GenerateRequest, SamplingParams
from mpi_workers.engine.torch.engine import TorchEngine

SHAPES = {  # vocab, hidden, intermediate, layers, heads, kv heads, tied, rope theta
    "llama8b": (128256, 4096, 14336, 32, 32, 8, False, 500000.0),
    "smollm2": (49152, 576, 1536, 30, 9, 3, True, 100000.0),
}


def write_random_model(folder: Path, shape: str) -> int:
    """A Llama checkpoint of `shape` with random bf16 weights; returns its weight bytes."""
    from safetensors.torch import save_file

    vocab, hidden, inter, layers, heads, kv, tied, theta = SHAPES[shape]
    dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * dim, hidden),
            p + "self_attn.k_proj.weight": (kv * dim, hidden),
            p + "self_attn.v_proj.weight": (kv * dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    tensors = {}
    for name, dims in shapes.items():
        if len(dims) == 1:
            t = 1.0 + 0.1 * torch.randn(dims, device="cuda")
        else:
            t = torch.randn(dims, device="cuda") * dims[-1] ** -0.5
        tensors[name] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": dim,
        "rms_norm_eps": 1e-5, "rope_theta": theta, "max_position_embeddings": 8192,
        "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "eos_token_id": 2,
        "bos_token_id": 1,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return sum(t.numel() * 2 for t in tensors.values())


async def run(engine: TorchEngine, batch: int, prompt: int, new: int, tag: str):
    """(seconds in all, seconds to the last first token, per-request first-token times)."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    vocab = engine.vocab_size
    firsts: list[float] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        salt = sum(map(ord, tag)) * 1009  # every run its own prompts: no prefix-cache hits
        ids = [(7919 * (i * prompt + j) + 11 + salt) % vocab for j in range(prompt)]
        request = GenerateRequest(request_id=f"{tag}-{i}", token_ids=ids, sampling=params)
        first = True
        async for _chunk in engine.generate(request):
            if first:
                firsts.append(time.perf_counter())
                first = False

    await asyncio.gather(*(one(i) for i in range(batch)))
    end = time.perf_counter()
    return end - start, max(firsts) - start, end - max(firsts)


def reference_step_s(engine: TorchEngine, batch: int, context: int, steps: int = 50) -> float:
    """Seconds per decode step of a minimal hand-written loop over the engine's own weights
    (gpt-fast style): contiguous KV [batch, kv heads, context, dim], SDPA with GQA, plain
    PyTorch layers, the whole step in one CUDA graph. What our generate path is held to."""
    import torch.nn.functional as F

    from mpi_workers.engine.torch.layers import apply_rope

    model, cfg, dev = engine.model, engine.config, torch.device("cuda")
    heads, kv, dim, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    split = cfg.intermediate_size
    layers = list(model.model.layers)
    caches = [(torch.randn(batch, kv, context, dim, device=dev, dtype=torch.bfloat16),
               torch.randn(batch, kv, context, dim, device=dev, dtype=torch.bfloat16))
              for _ in layers]  # fmt: skip
    ids = torch.zeros(batch, dtype=torch.long, device=dev)
    pos = context - 1
    cos, sin = model.rotary.lookup(torch.full((batch,), pos, device=dev), torch.bfloat16)

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def step() -> None:
        h = F.embedding(ids, model.model.embed_tokens.weight)
        for layer, (k_cache, v_cache) in zip(layers, caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(norm(h, layer.input_layernorm.weight), attn.qkv_proj.weight)
            qkv = qkv.view(batch, heads + 2 * kv, dim)
            qk = apply_rope(qkv[:, : heads + kv], cos, sin)
            k_cache[:, :, pos] = qk[:, heads:]
            v_cache[:, :, pos] = qkv[:, heads + kv :]
            o = F.scaled_dot_product_attention(qk[:, :heads].unsqueeze(2), k_cache, v_cache,
                                               enable_gqa=True)  # fmt: skip
            h = h + F.linear(o.reshape(batch, heads * dim), attn.o_proj.weight)
            gate_up = F.linear(norm(h, layer.post_attention_layernorm.weight),
                               mlp.gate_up_proj.weight)  # fmt: skip
            h = h + F.linear(F.silu(gate_up[:, :split]) * gate_up[:, split:],
                             mlp.down_proj.weight)  # fmt: skip
        logits = model.compute_logits(norm(h, model.model.norm.weight))
        ids.copy_(logits.argmax(-1))

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    del graph
    caches.clear()
    torch.cuda.empty_cache()
    return start.elapsed_time(end) / steps / 1e3


async def measure(engine: TorchEngine, args: argparse.Namespace, tag: str) -> dict[str, float]:
    """bs1 step, bs128 decode and end-to-end figures of the real generate path."""
    _, _, after = await run(engine, 1, args.prompt, args.new_tokens, f"{tag}-bs1")
    total, to_first, after128 = await run(engine, 128, args.prompt, args.new_tokens,
                                          f"{tag}-bs128")  # fmt: skip
    return {
        "bs1_step_s": after / (args.new_tokens - 1),
        "bs128_decode_tok_s": 128 * (args.new_tokens - 1) / after128,
        "bs128_step_s": after128 / (args.new_tokens - 1),
        "prefill_s": to_first,
        "e2e_tok_s": 128 * args.new_tokens / total,
    }


async def measure_mixed(engine: TorchEngine, args: argparse.Namespace) -> dict[str, float]:
    """End-to-end tok/s of batch 128 under a 512-token step budget (chunked prefill beside
    decode rows), mixed-step graphs on and off."""
    graphs = engine.runner.graphs
    assert graphs is not None
    budget, cap = engine.scheduler.max_num_batched_tokens, graphs.max_mixed_tokens
    engine.scheduler.max_num_batched_tokens = 512
    figures = {}
    try:
        await run(engine, 128, args.prompt, args.new_tokens, "mixed-warmup")  # capture
        for mode, limit in (("graphs", 512), ("eager", 0)):
            graphs.max_mixed_tokens = limit
            total, _, _ = await run(engine, 128, args.prompt, args.new_tokens, f"mixed-{mode}")
            figures[mode] = 128 * args.new_tokens / total
    finally:
        engine.scheduler.max_num_batched_tokens, graphs.max_mixed_tokens = budget, cap
    return figures


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        weight_bytes = write_random_model(folder, args.shape)
        print(f"wrote {weight_bytes / 1e9:.2f} GB of random weights in "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        # 0.6 of the GPU: room beside the KV pool for the reference loop's contiguous cache
        engine = TorchEngine(folder, device="cuda", dtype=torch.bfloat16, block_size=16,
                             max_num_seqs=128, max_num_batched_tokens=8192,
                             gpu_memory_utilization=0.6)  # fmt: skip
        await engine.start()
        try:
            # Warm-up at the measured shapes: every decode graph is captured before timing
            await run(engine, 1, args.prompt, args.new_tokens, "warmup1")
            await run(engine, 128, args.prompt, args.new_tokens, "warmup128")
            figures = {}
            for mode, overlap in (("synchronous", False), ("overlapped", True)):
                engine.overlap = overlap  # read at every step: same engine, same graphs
                figures[mode] = await measure(engine, args, mode)
            mixed = await measure_mixed(engine, args)
        finally:
            await engine.shutdown()
        context = args.prompt + args.new_tokens // 2
        ref1 = reference_step_s(engine, 1, context)
        ref128 = reference_step_s(engine, 128, context)
    _, hidden, _, num_layers, heads, kv_heads, _, _ = SHAPES[args.shape]
    kv_row = 2 * num_layers * kv_heads * (hidden // heads) * 2  # K and V, bf16, per token
    roofline = (weight_bytes + context * kv_row) / 4.17e12
    print(f"\n{'':<22}{'bs1 ms/step':>12}{'roofline':>10}{'bs128 tok/s':>13}"
          f"{'bs128 ms':>10}{'prefill s':>11}{'e2e tok/s':>11}")  # fmt: skip
    for mode, f in figures.items():
        print(f"{mode:<22}{f['bs1_step_s'] * 1e3:>12.2f}{roofline / f['bs1_step_s']:>10.2f}"
              f"{f['bs128_decode_tok_s']:>13.0f}{f['bs128_step_s'] * 1e3:>10.2f}"
              f"{f['prefill_s']:>11.2f}{f['e2e_tok_s']:>11.0f}")  # fmt: skip
    print(f"{'reference loop':<22}{ref1 * 1e3:>12.2f}{roofline / ref1:>10.2f}"
          f"{128 / ref128:>13.0f}{ref128 * 1e3:>10.2f}")  # fmt: skip
    print(f"(roofline {roofline * 1e3:.2f} ms at 4.17 TB/s; context {context})")
    print(f"busy server (512-token steps, e2e tok/s): mixed-step graphs {mixed['graphs']:.0f}, "
          f"eager {mixed['eager']:.0f}; "
          f"mixed_graphs_vs_eager={mixed['graphs'] / mixed['eager']:.2f}")
    over, sync = figures["overlapped"], figures["synchronous"]
    print(f"overlap_vs_sync bs1={sync['bs1_step_s'] / over['bs1_step_s']:.2f} "
          f"bs128={over['bs128_decode_tok_s'] / sync['bs128_decode_tok_s']:.2f} "
          f"e2e={over['e2e_tok_s'] / sync['e2e_tok_s']:.2f}")  # fmt: skip
    print(f"gpu_engine bs1_roofline={roofline / over['bs1_step_s']:.2f} "
          f"bs128_tok_s={over['bs128_decode_tok_s']:.0f} e2e_bs128_tok_s={over['e2e_tok_s']:.0f} "
          f"vs_reference_bs128={over['bs128_decode_tok_s'] * ref128 / 128:.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

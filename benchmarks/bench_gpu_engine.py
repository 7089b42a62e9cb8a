"""The torch engine on one GPU through its real `generate` path (scheduler, sampler, streams).

Random weights (written once to a safetensors folder, no download), greedy, EOS ignored,
prompts of --prompt tokens, --new-tokens generated. Measured: the decode step at batch 1
(time after the first token / tokens after it), batch-128 decode throughput (tokens after the
last request's first token / the time since), and batch-128 end to end (prefill included).
The last line: `gpu_engine bs1_step_ms=<x> bs1_roofline=<r> bs128_decode_tok_s=<y>
e2e_bs128_tok_s=<z>`.

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
        ids = [(7919 * (i * prompt + j) + 11) % vocab for j in range(prompt)]
        request = GenerateRequest(request_id=f"{tag}-{i}", token_ids=ids, sampling=params)
        first = True
        async for _chunk in engine.generate(request):
            if first:
                firsts.append(time.perf_counter())
                first = False

    await asyncio.gather(*(one(i) for i in range(batch)))
    end = time.perf_counter()
    return end - start, max(firsts) - start, end - max(firsts)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        weight_bytes = write_random_model(folder, args.shape)
        print(f"wrote {weight_bytes / 1e9:.2f} GB of random weights in "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        engine = TorchEngine(folder, device="cuda", dtype=torch.bfloat16, block_size=16,
                             max_num_seqs=128, max_num_batched_tokens=8192)  # fmt: skip
        await engine.start()
        try:
            await run(engine, 4, args.prompt, 16, "warmup")
            await run(engine, 128, args.prompt, 4, "warmup128")
            total, _, after = await run(engine, 1, args.prompt, args.new_tokens, "bs1")
            step = after / (args.new_tokens - 1)
            kv_row = 2 * SHAPES[args.shape][3] * SHAPES[args.shape][5] * 128 * 2
            roofline = (weight_bytes + (args.prompt + args.new_tokens // 2) * kv_row) / 4.17e12
            print(f"bs1: {step * 1e3:.2f} ms/step ({roofline / step:.2f} of the roofline "
                  f"{roofline * 1e3:.2f} ms at 4.17 TB/s)")  # fmt: skip
            total, to_first, after = await run(engine, 128, args.prompt, args.new_tokens, "bs128")
            decode = 128 * (args.new_tokens - 1) / after
            e2e = 128 * args.new_tokens / total
            print(f"bs128: decode {decode:.0f} tok/s ({after / (args.new_tokens - 1) * 1e3:.2f} "
                  f"ms/step), prefill of 128 x {args.prompt} tokens {to_first:.2f} s, "
                  f"end to end {e2e:.0f} tok/s")  # fmt: skip
            print(f"gpu_engine bs1_step_ms={step * 1e3:.2f} bs1_roofline={roofline / step:.2f} "
                  f"bs128_decode_tok_s={decode:.0f} e2e_bs128_tok_s={e2e:.0f}")  # fmt: skip
        finally:
            await engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

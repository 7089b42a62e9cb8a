"""One-row decode linears on one GPU: `triton_row` (O and down with the residual add, down with
SiLU·mul, fused) against cuBLAS plus the separate kernels the many-row path launches.

1. O and down of the Llama-3.1-8B and SmolLM2-135M shapes (bf16, random weights, enough
   copies that the weights stream from HBM, not L2), alone, for a sweep of block sizes:
   time per call and fraction of the copy bandwidth, beside `F.linear`'s (with the kernels
   the fusions replace).
2. A decoder layer without attention, both ways, in one CUDA graph over several layers:
   the many-row path (`add_and_norm` + QKV, O, `add_and_norm` + gate/up, SiLU·mul, down) vs
   `LlamaForCausalLM._one_row_layers`' (norm + QKV, O into the residual, norm + gate/up,
   SiLU·mul + down into the residual).

Last line: `gpu_row llama8b_layer_vs_baseline=<x> smollm2_layer_vs_baseline=<y>` (time
ratios, > 1: the one-row path is faster).

    python3 benchmarks/bench_gpu_row.py [--sweep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpi_workers.engine.torch import triton_ops, triton_row

SHAPES = {  # name -> (hidden, heads, kv heads, head dim, intermediate)
    "llama8b": (4096, 32, 8, 128, 14336),
    "smollm2": (576, 9, 3, 64, 1536),
}
STREAM_BYTES = 2 * 2**30  # weights per timed pass: well past the 50 MB L2
EPS = 1e-5


def seconds_per_pass(fn, passes: int = 5) -> float:
    """Seconds of one call of `fn` (itself a whole pass), best of `passes` graph replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    best = float("inf")
    for _ in range(passes):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / seconds_per_pass(lambda: dst.copy_(src))


class Layers:
    """`count` layers' weights of one shape (random, bf16), and one activation row."""

    def __init__(self, shape: str, dtype: torch.dtype = torch.bfloat16) -> None:
        hidden, heads, kv_heads, head_dim, inter = SHAPES[shape]
        self.hidden, self.inter = hidden, inter
        per_layer = 2 * hidden * ((2 * heads + 2 * kv_heads) * head_dim + 3 * inter)
        self.count = max(2, STREAM_BYTES // per_layer)

        def weights(out: int, inp: int) -> list[torch.Tensor]:
            return [torch.randn(out, inp, dtype=dtype, device="cuda") / inp**0.5
                    for _ in range(self.count)]  # fmt: skip

        self.qkv = weights((heads + 2 * kv_heads) * head_dim, hidden)
        self.o = weights(hidden, heads * head_dim)
        self.gate_up = weights(2 * inter, hidden)
        self.down = weights(hidden, inter)
        self.norm = [torch.rand(hidden, dtype=dtype, device="cuda") + 0.5 for _ in range(2)]
        self.h = torch.randn(1, hidden, dtype=dtype, device="cuda")
        self.attn = torch.randn(1, self.o[0].shape[1], dtype=dtype, device="cuda")

    def baseline(self) -> None:
        """cuBLAS linears with the separate fused kernels of the many-row path."""
        h, x = self.h, triton_ops.rms_norm(self.h, self.norm[0], EPS)
        for i in range(self.count):
            F.linear(x, self.qkv[i])
            y = F.linear(self.attn, self.o[i])
            x = triton_ops.rms_norm(y, self.norm[1], EPS, h)
            act = triton_ops.silu_mul(F.linear(x, self.gate_up[i]), self.inter)
            y = F.linear(act, self.down[i])
            x = triton_ops.rms_norm(y, self.norm[0], EPS, h)

    def one_row(self) -> None:
        h, x = self.h, triton_ops.rms_norm(self.h, self.norm[0], EPS)
        for i in range(self.count):
            F.linear(x, self.qkv[i])
            triton_row.row_linear(self.attn, self.o[i], residual=h)
            gate_up = F.linear(triton_ops.rms_norm(h, self.norm[1], EPS), self.gate_up[i])
            triton_row.row_linear(gate_up, self.down[i], residual=h, glu_input=True)
            x = triton_ops.rms_norm(h, self.norm[0], EPS)


def sweep(name: str, layers: Layers, bandwidth: float) -> None:
    gate_up = torch.randn(1, 2 * layers.inter, dtype=layers.h.dtype, device="cuda")
    cases = {  # name: weights, row_linear kwargs, its input, what cuBLAS runs instead
        "o+residual": (
            layers.o, dict(residual=layers.h), layers.attn,
            lambda x, w: F.linear(x, w),
        ),
        "silu_mul+down+residual": (
            layers.down, dict(residual=layers.h, glu_input=True), gate_up,
            lambda x, w: F.linear(triton_ops.silu_mul(x, layers.inter), w),
        ),
    }  # fmt: skip
    for case, (weights, kwargs, x, cublas_call) in cases.items():
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        ideal = nbytes / bandwidth
        cublas = seconds_per_pass(lambda x=x, ws=weights, c=cublas_call: [c(x, w) for w in ws])
        default = triton_row.blocks_for(*weights[0].shape)
        print(f"  {name} {case:<24} cuBLAS {ideal / cublas:.3f} of bw; default {default}")
        results = []
        configs = [
            (block_n, block_k, warps, 1)
            for block_n in (2, 4, 8, 16)
            for block_k in (256, 512, 1024, 2048)
            for warps in (4, 8)
        ]
        for blocks in [default, *configs]:

            def run(x=x, ws=weights, kw=kwargs, b=blocks) -> None:
                for w in ws:
                    triton_row.row_linear(x, w, blocks=b, **kw)

            try:
                t = seconds_per_pass(run, passes=3)
            except Exception as error:  # a config that does not compile
                print(f"    {blocks}: {type(error).__name__}")
                continue
            results.append((t, blocks))
        for t, blocks in [results[0], *sorted(results[1:])[:4]]:
            print(f"    {blocks}: {ideal / t:.3f} of bw, {cublas / t:.3f}x cuBLAS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="also sweep block sizes")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    ratios = {}
    for shape in SHAPES:
        layers = Layers(shape)
        if args.sweep:
            sweep(shape, layers, bandwidth)
        baseline_h = layers.h.clone()
        base = seconds_per_pass(layers.baseline) / layers.count
        layers.h.copy_(baseline_h)
        fused = seconds_per_pass(layers.one_row) / layers.count
        ratios[shape] = base / fused
        print(f"{shape}: one layer without attention: baseline {base * 1e6:.1f} us, "
              f"one-row {fused * 1e6:.1f} us ({base / fused:.3f}x)")  # fmt: skip
    print(
        f"gpu_row llama8b_layer_vs_baseline={ratios['llama8b']:.3f} "
        f"smollm2_layer_vs_baseline={ratios['smollm2']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

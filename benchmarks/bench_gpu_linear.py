"""Decode-step linears on one GPU: our Triton skinny kernel against cuBLAS (`F.linear`).

For each linear of the Llama-3.1-8B and SmolLM2-135M shapes (bf16, random weights) and a few
row counts, the time of one call (CUDA graph of 20 calls, best of 5) for both, as a fraction of
the copy bandwidth (the weight read once), and the ratio. Decides the row limit under which the
engine's CUDA device path takes the Triton kernel. Last line:
`gpu_linear llama8b_bs1_vs_cublas=<x> smollm2_bs1_vs_cublas=<y>` (time ratios, >1: faster).

    python3 benchmarks/bench_gpu_linear.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpi_workers.engine.torch.triton_linear import skinny_linear

SHAPES = {  # name -> [(linear, out, in)]
    "llama8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                ("down", 4096, 14336)],
    "smollm2": [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)],
}  # fmt: skip
ROWS = (1, 4, 8, 16)


def seconds_per_call(fn, calls: int = 20) -> float:
    fn()  # compile / tune outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / seconds_per_call(lambda: dst.copy_(src), 5)


def main() -> int:
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    summary = {}
    for shape, linears in SHAPES.items():
        total = {"triton": 0.0, "cublas": 0.0}
        print(f"\n{shape:<10}{'rows':>5}{'cuBLAS us':>11}{'of bw':>7}{'Triton us':>11}{'of bw':>7}"
              f"{'speedup':>9}")  # fmt: skip
        for name, out, inp in linears:
            weight = torch.randn(out, inp, dtype=torch.bfloat16, device="cuda")
            ideal = weight.numel() * 2 / bandwidth
            for rows in ROWS:
                x = torch.randn(rows, inp, dtype=torch.bfloat16, device="cuda")
                torch.testing.assert_close(skinny_linear(x, weight), F.linear(x, weight),
                                           atol=0.5, rtol=0.02)  # fmt: skip
                cublas = seconds_per_call(lambda x=x, w=weight: F.linear(x, w))
                triton = seconds_per_call(lambda x=x, w=weight: skinny_linear(x, w))
                if rows == 1:
                    total["cublas"] += cublas
                    total["triton"] += triton
                print(f"{name:<10}{rows:>5}{cublas * 1e6:>11.1f}{ideal / cublas:>7.2f}"
                      f"{triton * 1e6:>11.1f}{ideal / triton:>7.2f}{cublas / triton:>9.2f}")
        summary[shape] = total["cublas"] / total["triton"]
        print(f"{shape} one layer at 1 row: cuBLAS {total['cublas'] * 1e6:.1f} us, "
              f"Triton {total['triton'] * 1e6:.1f} us")  # fmt: skip
    print(f"gpu_linear llama8b_bs1_vs_cublas={summary['llama8b']:.2f} "
          f"smollm2_bs1_vs_cublas={summary['smollm2']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the GPU time of one decode step goes: kernels by total time, and each linear layer's
bandwidth on its own, against the copy bandwidth measured in the same run.

The model runner's real decode path (CUDA graph, fused Triton layers, paged attention) at
--batch rows and --context tokens, random weights; `torch.profiler` over --iters replays.
Then every distinct linear shape of the model is timed alone (`F.linear`, --batch rows) to
tell GEMM efficiency from everything else. Imports only torch and our engine modules.

    python3 benchmarks/profile_gpu_decode.py --shape llama8b --batch 1
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu_decode import copy_bandwidth
from bench_tp import BLOCK, Driver, build_model, decode_plan, model_config

from mpi_workers.engine.torch.kv_cache import KvCache
from mpi_workers.engine.torch.layers import TpGroup
from mpi_workers.engine.torch.model_runner import ModelRunner


def timed(fn, iters: int) -> float:
    """Seconds per call of `fn`, captured in one CUDA graph of `iters` calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=["llama8b", "smollm2"], default="llama8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = model_config(args.shape)
    model = build_model(cfg, TpGroup(), device, dtype, 1234, args.context + 2 * BLOCK)
    cache = KvCache(cfg, -(-(args.context + 1) // BLOCK) * args.batch, BLOCK, dtype, device, 1)
    runner = ModelRunner(model, cache, max_num_seqs=args.batch)
    driver = Driver(runner, None, device)
    plan = decode_plan(args.batch, args.context)
    step = driver.time_plan(plan, args.iters)
    bandwidth = copy_bandwidth(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"step {step * 1e3:.3f} ms; weights {weights / 1e9:.2f} GB at {bandwidth / 1e12:.2f} "
          f"TB/s copy bandwidth = {weights / bandwidth * 1e3:.3f} ms")  # fmt: skip

    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.iters):
            runner.execute(plan)
        torch.cuda.synchronize()
    by_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[event.name[:90]] += event.device_time_total
            counts[event.name[:90]] += 1
    total = sum(by_kernel.values())
    print(f"\nGPU kernel time per step {total / args.iters / 1e3:.3f} ms "
          f"({total / args.iters / 1e3 / (step * 1e3):.2f} of the step)")  # fmt: skip
    for name, micros in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:18]:
        print(f"{micros / args.iters:9.1f} us/step {micros / total:6.1%} "
              f"x{counts[name] // args.iters:<4} {name}")  # fmt: skip

    print("\nlinear layers alone (F.linear, the model's weights):")
    seen: dict[tuple[int, int], torch.Tensor] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and module is not model:
            seen.setdefault(tuple(weight.shape), weight)
    for (n, k), weight in sorted(seen.items()):
        x = torch.randn(args.batch, k, device=device, dtype=dtype)
        seconds = timed(lambda weight=weight, x=x: F.linear(x, weight), 50)
        achieved = n * k * 2 / seconds
        print(f"  [{n:>6} x {k:>5}] {seconds * 1e6:8.1f} us  {achieved / 1e12:5.2f} TB/s "
              f"({achieved / bandwidth:.2f} of copy)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

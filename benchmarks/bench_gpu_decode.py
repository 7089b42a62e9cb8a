"""GPU decode step of the torch engine: its Triton kernels against the PyTorch paths they replace.

One process, one GPU, random weights (no download), the model runner's real decode path
(CUDA graphs, LM head included): a decode step at batch 1, 64 and 128 with a context of
--context tokens, in three builds of the same model:
- `fused`: decode attention reads K/V in place through the block tables (Triton, split-K at
  small batches) and RMSNorm (+ residual add), RoPE and SiLU·mul are one Triton kernel each;
- `paged`: the same attention, the PyTorch elementwise layers;
- `gather`: the previous path (every row's padded context gathered out of the cache in
  every layer, masked SDPA) with the PyTorch layers.
Each figure is also a fraction of the roofline: (weights + the KV read) / the copy bandwidth
measured in the same run. The last line:
`gpu_decode bs1_roofline=<x> bs128_tok_s=<y> vs_gather_bs1=<a> vs_gather_bs128=<b>`.

Imports only torch and our engine modules (no pydantic), so it runs on the GPU machine as is:
    python3 benchmarks/bench_gpu_decode.py --shape llama8b
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_tp import BLOCK, Driver, build_model, decode_plan, model_config

from mpi_workers.engine.torch.kv_cache import KvCache
from mpi_workers.engine.torch.layers import TpGroup
from mpi_workers.engine.torch.model_runner import ModelRunner

BATCHES = (1, 64, 128)


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    """Switch the model between its Triton elementwise kernels and the PyTorch layers."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 10."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=["llama8b", "smollm2"], default="llama8b")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    dtype = torch.bfloat16
    cfg = model_config(args.shape)
    max_pos = args.context + 2 * BLOCK
    model = build_model(cfg, TpGroup(), device, dtype, 1234, max_pos)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_seq = -(-(args.context + 1) // BLOCK)
    kv_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K+V bytes per token
    bandwidth = copy_bandwidth(device)
    print(f"shape {args.shape}: weights {weight_bytes / 1e9:.2f} GB, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, context {args.context}")  # fmt: skip
    results: dict[tuple[str, int], float] = {}
    for build, paged, fused in (("fused", True, True), ("paged", True, False),
                                ("gather", False, False)):  # fmt: skip
        set_fused(model, fused)
        cache = KvCache(cfg, per_seq * max(BATCHES), BLOCK, dtype, device, 1)
        runner = ModelRunner(model, cache, max_num_seqs=max(BATCHES))
        if not paged:  # gather + masked SDPA instead of the device path's kernel
            runner.decode_attention = None
            if runner.graphs is not None:
                runner.graphs.decode_attention = None
        driver = Driver(runner, None, device)
        for batch in BATCHES:
            seconds = driver.time_plan(decode_plan(batch, args.context), args.iters)
            results[(build, batch)] = seconds
            roofline = (weight_bytes + batch * (args.context + 1) * kv_row) / bandwidth
            print(f"{build:<6} bs{batch:<4} {seconds * 1e3:7.2f} ms/step "
                  f"{batch / seconds:9.0f} tok/s  {roofline / seconds:.2f} of the roofline "
                  f"({roofline * 1e3:.2f} ms)")  # fmt: skip
        del driver, runner, cache
        torch.cuda.empty_cache()
    bs1 = (weight_bytes + (args.context + 1) * kv_row) / bandwidth / results[("fused", 1)]
    print(
        f"gpu_decode bs1_roofline={bs1:.2f} bs128_tok_s={128 / results[('fused', 128)]:.0f} "
        f"vs_gather_bs1={results[('gather', 1)] / results[('fused', 1)]:.2f} "
        f"vs_gather_bs128={results[('gather', 128)] / results[('fused', 128)]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Disaggregated serving costs: KV transfer throughput per transport, and TTFT/ITL agg vs disagg.

1. KV transfer: a receiver process and this process exchange KV-shaped tensors (SmolLM2's
   layout) over each transport: `ucx` (ucxx), `nixl`, and `tcp` — the baseline, plain asyncio
   sockets (no registration, no zero-copy). MiB/s = bytes / (push start → receiver saw it).
2. Serving (CPU): `configs/local-agg.yaml` vs `configs/local-disagg.yaml` (decode_first and
   prefill_first) through the frontend, streaming, greedy, ignore_eos: TTFT and ITL p50/p99
   at concurrency 1 and 8 (bench_serving.py's definitions).
3. `--device cuda` (a machine with 2 GPUs): GPU→GPU KV transfer, prefill tensors on cuda:0,
   decode buffers on cuda:1 in another process, over ucx/nixl when importable; otherwise (and
   always, as references) a torch.distributed NCCL send/recv and a direct peer copy
   cuda:0→cuda:1. Each line says which mechanism it measured.

    python benchmarks/bench_disagg.py [--skip-serving] [--sizes-mib 24 256]
    python benchmarks/bench_disagg.py --device cuda --skip-serving
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, fp32, 16-token blocks: 720 KiB per block
LAYOUT = {"num_layers": 30, "block_size": 16, "num_kv_heads": 3, "head_dim": 64,
          "dtype": "float32"}  # fmt: skip
BLOCK_BYTES = 2 * 30 * 16 * 3 * 64 * 4


# ---- 1. KV transfer between two processes ---------------------------------------------------


def _receiver(backend: str, device: str, sizes: list[int], repeats: int, conn) -> None:
    import torch

    from mpi_workers.kv_transfer import KvLayout, make_transport

    async def main() -> None:
        transport = make_transport(backend, "bench-recv")
        await transport.start()
        layout = KvLayout(**LAYOUT)
        for size in sizes:
            for rep in range(repeats + 1):
                buffer = torch.empty(size // 4, dtype=torch.float32, device=device)
                ticket = transport.expect(f"{size}-{rep}", buffer, layout)
                conn.send(ticket)
                await transport.wait(f"{size}-{rep}", 120)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                conn.send(time.perf_counter())
        await transport.close()

    asyncio.run(main())


def bench_transfer(backend: str, sizes: list[int], repeats: int, src_dev: str, dst_dev: str):
    """Median MiB/s per size for `backend` (None when it is not installed)."""
    import torch

    from mpi_workers.kv_transfer import KvLayout, make_transport

    try:
        sender = make_transport(backend, "bench-send")
    except ImportError as exc:
        return f"not available ({exc})"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(backend, dst_dev, sizes, repeats, child))
    proc.start()
    results: dict[int, float] = {}

    async def main() -> None:
        await sender.start()
        layout = KvLayout(**LAYOUT)
        for size in sizes:
            data = torch.randn(size // 4, device=src_dev)
            rates = []
            for rep in range(repeats + 1):  # the first one warms up the connection
                ticket = await asyncio.to_thread(parent.recv)
                start = time.perf_counter()
                await sender.push(ticket, data, layout)
                landed = await asyncio.to_thread(parent.recv)
                if rep:
                    rates.append(size / 2**20 / (landed - start))
            results[size] = statistics.median(rates)
        await sender.close()

    try:
        asyncio.run(main())
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    return results


# ---- 3. GPU references: NCCL send/recv, peer copy ---------------------------------------------


def _nccl_rank(rank: int, sizes: list[int], repeats: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    for size in sizes:
        buffer = torch.randn(size // 4, device=f"cuda:{rank}")
        rates = []
        for rep in range(repeats + 1):
            dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buffer, 1)
            else:
                dist.recv(buffer, 0)
            torch.cuda.synchronize()
            if rep:
                rates.append(size / 2**20 / (time.perf_counter() - start))
        if rank == 1:
            queue.put((size, statistics.median(rates)))
    dist.destroy_process_group()


def bench_nccl(sizes: list[int], repeats: int) -> dict[int, float] | str:
    import torch

    if torch.cuda.device_count() < 2:
        return "needs 2 GPUs"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_nccl_rank, args=(r, sizes, repeats, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    out = {}
    while not queue.empty():
        size, rate = queue.get()
        out[size] = rate
    return out or "NCCL run failed"


def bench_peer_copy(sizes: list[int], repeats: int) -> dict[int, float] | str:
    import torch

    if torch.cuda.device_count() < 2:
        return "needs 2 GPUs"
    out = {}
    for size in sizes:
        src = torch.randn(size // 4, device="cuda:0")
        dst = torch.empty(size // 4, device="cuda:1")
        rates = []
        for rep in range(repeats + 1):
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            start = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(1)
            if rep:
                rates.append(size / 2**20 / (time.perf_counter() - start))
        out[size] = statistics.median(rates)
    return out


def print_rates(name: str, result, gpu: bool) -> None:
    if isinstance(result, str):
        print(f"  {name:<34} {result}")
        return
    for size, rate in result.items():
        shown = f"{rate / 1024:8.2f} GiB/s" if gpu else f"{rate:8.0f} MiB/s"
        print(f"  {name:<34} {size / 2**20:7.1f} MiB ({size // BLOCK_BYTES:5d} blocks) {shown}")


# ---- 2. serving: agg vs disagg ------------------------------------------------------------------


async def serve_levels(config, workload) -> dict:
    import bench_serving as bs

    return await bs.run_served(config, workload)


def bench_serving(concurrency: list[int], output_tokens: int, prompt_tokens: int) -> None:
    import bench_serving as bs

    from contract.config import load_config
    from hpcserve.model_prepare import prepare_default_model

    model_dir = prepare_default_model()
    workload = []
    for c in concurrency:
        prompts = bs.make_prompts(model_dir, max(4, c), prompt_tokens, f"d{c}")
        workload.append((c, prompts, output_tokens))
    setups = [
        ("agg", "configs/local-agg.yaml", []),
        ("disagg decode_first ucx", "configs/local-disagg.yaml",
         ["disaggregation.strategy=decode_first"]),
        ("disagg prefill_first ucx", "configs/local-disagg.yaml",
         ["disaggregation.strategy=prefill_first"]),
    ]  # fmt: skip
    rows = []
    for name, path, sets in setups:
        run_dir = tempfile.mkdtemp(prefix="hpcserve-bench-disagg-")
        config = load_config(
            REPO / path, ["frontend.port=0", f"run_dir={run_dir}", *sets], environ={}
        )
        levels = asyncio.run(serve_levels(config, workload))
        for c, level in levels.items():
            rows.append((c, name, level))
    print(
        f"\nServing (CPU, prompt {prompt_tokens} tokens, output {output_tokens}, greedy, "
        "ignore_eos)"
    )
    print(f"{'conc':>4} {'setup':<26} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8} {'tok/s':>7}")  # fmt: skip
    for c, name, level in sorted(rows, key=lambda r: r[0]):
        print(
            f"{c:>4} {name:<26} {level.ttft(50) * 1e3:7.1f}ms {level.ttft(99) * 1e3:7.1f}ms "
            f"{level.itl(50) * 1e3:6.1f}ms {level.itl(99) * 1e3:6.1f}ms "
            f"{level.tokens_per_s:7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[22.5, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transports", nargs="+", default=["ucx", "nixl", "tcp"])
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    args = parser.parse_args()
    sizes = [int(s * 2**20) // 4 * 4 for s in args.sizes_mib]
    gpu = args.device == "cuda"
    src, dst = ("cuda:0", "cuda:1") if gpu else ("cpu", "cpu")
    print(f"KV transfer between two processes, {src} → {dst} (median of {args.repeats}):")
    for backend in args.transports:
        label = f"{backend} ({'plain asyncio TCP baseline' if backend == 'tcp' else 'transport'})"
        try:
            result = bench_transfer(backend, sizes, args.repeats, src, dst)
        except Exception as exc:  # a transport that cannot do this device pair here
            result = f"failed: {type(exc).__name__}: {exc}"
        print_rates(label, result, gpu)
    if gpu:
        print_rates("NCCL send/recv (torch.distributed)", bench_nccl(sizes, args.repeats), True)
        print_rates("peer copy cuda:0→cuda:1 (1 process)", bench_peer_copy(sizes, args.repeats),
                    True)  # fmt: skip
    if not args.skip_serving:
        bench_serving(args.concurrency, args.output_tokens, args.prompt_tokens)


if __name__ == "__main__":
    main()

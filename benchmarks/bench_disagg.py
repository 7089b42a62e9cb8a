"""Disaggregated serving costs: KV transfer throughput per transport, and TTFT/ITL agg vs disagg.

1. KV transfer: a receiver process and this process exchange KV-shaped tensors (SmolLM2's
   layout) over each transport: `ucx` (ucxx), `nixl`, and `tcp` — the baseline, plain asyncio
   sockets (no registration, no zero-copy). MiB/s = bytes / (push start → receiver saw it).
2. Serving: `configs/local-agg.yaml` vs `configs/local-disagg.yaml` (decode_first and
   prefill_first, over each of `--serving-transports`) through the frontend, streaming, greedy,
   ignore_eos: TTFT and ITL p50/p99 at concurrency 1 and 8 (bench_serving.py's definitions).
   With `--device cuda` every worker process gets one GPU through CUDA_VISIBLE_DEVICES:
   prefill on GPU 0, decode on GPU 1, agg workers on GPU 0, 1, ... (setup `agg2`: two agg
   workers, one per GPU: the same two GPUs as disagg).
3. `--device cuda` (a machine with 2 GPUs): GPU→GPU KV transfer, prefill tensors on cuda:0,
   decode buffers on cuda:1 in another process, over ucx/nixl when importable; otherwise (and
   always, as references) a torch.distributed NCCL send/recv and a direct peer copy
   cuda:0→cuda:1. Each line says which mechanism it measured. `--isolate-gpus`: each of the two
   processes sees only its own GPU (CUDA_VISIBLE_DEVICES), as the serving deployment runs them.

    python benchmarks/bench_disagg.py [--skip-serving] [--sizes-mib 24 256]
    python benchmarks/bench_disagg.py --device cuda --skip-serving [--isolate-gpus]
    python benchmarks/bench_disagg.py --device cuda --skip-transfer --model DIR --random-weights \\
        --requests 32 --output-tokens 64 --serving-transports ucx tcp
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
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


@contextlib.contextmanager
def _visible_gpus(gpus: str | None):
    """CUDA_VISIBLE_DEVICES for the processes started inside (None: leave it alone)."""
    if gpus is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def bench_transfer(
    backend: str,
    sizes: list[int],
    repeats: int,
    src_dev: str,
    dst_dev: str,
    receiver_gpus: str | None = None,
    timeout_s: float = 120,
):
    """Median MiB/s per size for `backend` (a string saying why when it cannot run here).
    `receiver_gpus`: the receiver process's CUDA_VISIBLE_DEVICES (`dst_dev` counts in it)."""
    import torch

    from mpi_workers.kv_transfer import KvLayout, make_transport

    try:
        sender = make_transport(backend, "bench-send")
    except ImportError as exc:
        return f"not available ({exc})"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(backend, dst_dev, sizes, repeats, child))
    with _visible_gpus(receiver_gpus):
        proc.start()

    def receive():  # from the receiver process; a dead or stuck one fails this size
        if not parent.poll(timeout_s):
            raise TimeoutError(f"the {backend} receiver sent nothing for {timeout_s:.0f} s")
        return parent.recv()

    results: dict[int, float] = {}

    async def main() -> None:
        await sender.start()
        layout = KvLayout(**LAYOUT)
        for size in sizes:
            data = torch.randn(size // 4, device=src_dev)
            rates = []
            for rep in range(repeats + 1):  # the first one warms up the connection
                ticket = await asyncio.to_thread(receive)
                start = time.perf_counter()
                await asyncio.wait_for(sender.push(ticket, data, layout), timeout_s)
                landed = await asyncio.to_thread(receive)
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


SETUPS = {
    # name: (config file, --set overrides)
    "agg": ("configs/local-agg.yaml", []),
    "agg2": ("configs/local-agg.yaml", ["workers.0.count=2"]),
    "decode_first": ("configs/local-disagg.yaml", ["disaggregation.strategy=decode_first"]),
    "prefill_first": ("configs/local-disagg.yaml", ["disaggregation.strategy=prefill_first"]),
}
WORKER_ROLES = ("agg", "prefill", "decode")


def random_checkpoint(src: Path, dtype: str = "bfloat16") -> Path:
    """A copy of `src` (config.json, tokenizer, templates) with random weights of the shape its
    Llama/Qwen2/Mistral config implies, so a GPU machine needs no real checkpoint: with
    `ignore_eos` and a fixed output length the timing does not depend on the weight values."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    bias = cfg.get("attention_bias", cfg.get("model_type") == "qwen2")
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], hidden)
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        projections = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
        for name, rows in projections.items():
            shapes[f"{pre}self_attn.{name}_proj.weight"] = (rows, hidden)
            if bias:
                shapes[f"{pre}self_attn.{name}_proj.bias"] = (rows,)
        shapes[f"{pre}self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[f"{pre}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{pre}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{pre}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{pre}input_layernorm.weight"] = (hidden,)
        shapes[f"{pre}post_attention_layernorm.weight"] = (hidden,)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        elif len(shape) == 1:
            tensor = torch.zeros(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        tensors[name] = tensor.to(getattr(torch, dtype))
    out = Path(tempfile.mkdtemp(prefix="hpcserve-random-model-")) / src.name
    out.mkdir()
    for item in src.iterdir():
        weights = item.name.endswith(".safetensors") or item.name.endswith(".index.json")
        if item.is_file() and not weights:
            shutil.copy(item, out / item.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def start_on_gpus(config, say):
    """`start_deployment` with one GPU per worker process (each sees only its own): prefill
    on GPU 0, decode on GPU 1, agg workers round-robin over the GPUs."""
    import torch

    from hpcserve.launcher import start_deployment

    gpus = max(1, torch.cuda.device_count())

    def pin_gpus(deployment) -> None:
        agg = 0
        for planned in deployment.plan:
            if planned.role not in WORKER_ROLES:
                continue
            if planned.role == "agg":
                gpu, agg = agg % gpus, agg + 1
            else:
                gpu = (0 if planned.role == "prefill" else 1) % gpus
            planned.env["CUDA_VISIBLE_DEVICES"] = str(gpu)  # a frozen dataclass, a mutable dict

    return start_deployment(config, say, adjust=pin_gpus)


async def serve_levels(config, workload, start=None) -> dict:
    import bench_serving as bs

    return await bs.run_served(config, workload, **({"start": start} if start else {}))


def bench_serving(args) -> None:
    import bench_serving as bs

    from contract.config import load_config

    gpu = args.device == "cuda"
    if args.model:
        model_dir = Path(args.model).expanduser()
    else:
        from hpcserve.model_prepare import prepare_default_model

        model_dir = prepare_default_model()
    if args.random_weights:
        model_dir = random_checkpoint(model_dir)
    # warm-up first: one request per worker slot at the highest concurrency, short outputs, so
    # that no measured request pays a worker's first prefill/decode shapes (its result is
    # replaced by the measured level of the same concurrency, which runs later)
    top = max(args.concurrency)
    warm = bs.make_prompts(model_dir, max(2 * top, 4), args.prompt_tokens, "warm")
    workload = [(top, warm, 4)]
    for c in args.concurrency:
        prompts = bs.make_prompts(model_dir, max(args.requests, c), args.prompt_tokens, f"d{c}")
        workload.append((c, prompts, args.output_tokens))
    common = [f"model.path={model_dir}"]
    if gpu:
        common += ["engine.device=cuda", f"engine.kv_cache_memory_mb={args.kv_cache_mb}"]
    setups = []
    for name in args.setups:
        path, sets = SETUPS[name]
        if name.startswith("agg"):
            setups.append((name, path, sets))
            continue
        for transport in args.serving_transports:
            setups.append(
                (f"{name} {transport}", path, [*sets, f"disaggregation.kv_transfer={transport}"])
            )
    rows = []
    for name, path, sets in setups:
        run_dir = tempfile.mkdtemp(prefix="hpcserve-bench-disagg-")
        config = load_config(
            REPO / path, ["frontend.port=0", f"run_dir={run_dir}", *common, *sets], environ={}
        )
        print(f"-- {name}: {path} {' '.join(sets)} (run folder {run_dir})", flush=True)
        try:
            levels = asyncio.run(serve_levels(config, workload, start_on_gpus if gpu else None))
        except Exception as exc:  # one setup failing leaves the others' figures
            print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        for c, level in levels.items():
            rows.append((c, name, level))
            print(f"   {_row(c, name, level)}", flush=True)
    where = "GPU: prefill/agg on GPU 0, decode on GPU 1" if gpu else "CPU"
    weights = ", random weights" if args.random_weights else ""
    print(
        f"\nServing ({where}{weights}, prompt {args.prompt_tokens} tokens, output "
        f"{args.output_tokens}, greedy, ignore_eos, {args.requests} requests per level)"
    )
    print(f"{'conc':>4} {'setup':<26} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8} {'tok/s':>7}")  # fmt: skip
    for c, name, level in sorted(rows, key=lambda r: r[0]):
        print(_row(c, name, level))


def _row(c: int, name: str, level) -> str:
    return (
        f"{c:>4} {name:<26} {level.ttft(50) * 1e3:7.1f}ms {level.ttft(99) * 1e3:7.1f}ms "
        f"{level.itl(50) * 1e3:6.1f}ms {level.itl(99) * 1e3:6.1f}ms {level.tokens_per_s:7.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[22.5, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transports", nargs="+", default=["ucx", "nixl", "tcp"])
    parser.add_argument(
        "--isolate-gpus", action="store_true",
        help="transfer: each process sees only its GPU (CUDA_VISIBLE_DEVICES), as when serving",
    )  # fmt: skip
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=4, help="per level (at least conc)")
    parser.add_argument(
        "--setups",
        nargs="+",
        choices=list(SETUPS),
        default=["agg", "decode_first", "prefill_first"],
    )
    parser.add_argument("--serving-transports", nargs="+", default=["ucx"])
    parser.add_argument("--model", help="HF model folder (default: the prepared SmolLM2)")
    parser.add_argument(
        "--random-weights", action="store_true",
        help="serve random weights of --model's shape (its config.json and tokenizer suffice)",
    )  # fmt: skip
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="per GPU worker")
    args = parser.parse_args()
    if not args.skip_transfer:
        bench_transfers(args)
    if not args.skip_serving:
        bench_serving(args)


def bench_transfers(args) -> None:
    sizes = [int(s * 2**20) // 4 * 4 for s in args.sizes_mib]
    gpu = args.device == "cuda"
    src, dst = ("cuda:0", "cuda:1") if gpu else ("cpu", "cpu")
    receiver_gpus = None
    if gpu and args.isolate_gpus:
        # before this process touches CUDA: it sees GPU 0 only, the receiver GPU 1 only
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        src, dst, receiver_gpus = "cuda:0", "cuda:0", "1"
    where = f"{src} → {dst}" + (" (GPU 0 → GPU 1, each process sees one)" if receiver_gpus else "")
    print(f"KV transfer between two processes, {where} (median of {args.repeats}):", flush=True)
    for backend in args.transports:
        label = f"{backend} ({'plain asyncio TCP baseline' if backend == 'tcp' else 'transport'})"
        try:
            result = bench_transfer(backend, sizes, args.repeats, src, dst, receiver_gpus)
        except Exception as exc:  # a transport that cannot do this device pair here
            result = f"failed: {type(exc).__name__}: {exc}"
        print_rates(label, result, gpu)
    if gpu and not receiver_gpus:
        print_rates("NCCL send/recv (torch.distributed)", bench_nccl(sizes, args.repeats), True)
        print_rates("peer copy cuda:0→cuda:1 (1 process)", bench_peer_copy(sizes, args.repeats),
                    True)  # fmt: skip


if __name__ == "__main__":
    main()

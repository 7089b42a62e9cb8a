"""Tensor-parallel speed and exactness of the torch engine: TP=1 vs TP=N in one invocation.

Builds a Llama-shaped model with random weights (seeded per parameter, identical on every
rank; each TP rank shards the full tensor through the engine's own weight loaders), then:
  1. rank 0 alone runs the TP=1 model (the other ranks wait quietly);
  2. all N ranks run the TP=N model as the engine does: rank 0 broadcasts each step plan,
     every rank executes its shard, all-reduces (NCCL on GPU, gloo on CPU).
Measured each time: decode step time at batch 1 and 32 (context --context tokens), prefill
tokens/s (one --prefill-token sequence), greedy tokens of 4 prompts and their prefill logits.
Printed: TP=1, TP=N and their ratio, max |logit diff| and greedy-token equality.

Only torch, mpi4py and our engine modules are imported (no pydantic/nats/safetensors).

    # 2 GPUs (Open MPI): Llama-3.1-8B shape, bf16
    mpirun --allow-run-as-root --bind-to none -n 2 python3 benchmarks/bench_tp.py
    # CPU smoke test (spawns mpirun itself when started alone)
    python benchmarks/bench_tp.py --shape tiny --tp 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mpi_workers.engine.torch.kv_cache import KvCache
from mpi_workers.engine.torch.layers import RotaryEmbedding, TpGroup
from mpi_workers.engine.torch.model import LlamaForCausalLM
from mpi_workers.engine.torch.model_config import ModelConfig
from mpi_workers.engine.torch.model_runner import ModelRunner, StepPlan

SHAPES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv heads, tied, rope theta)
    "llama8b": (128256, 4096, 14336, 32, 32, 8, False, 500000.0),
    "smollm2": (49152, 576, 1536, 30, 9, 3, True, 100000.0),
    "tiny": (512, 128, 256, 2, 8, 4, True, 10000.0),
}
BLOCK = 16
PROMPTS, PROMPT_LEN, GREEDY_TOKENS = 4, 32, 16
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def say(message: str) -> None:
    print(f"bench_tp: {message}", flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    p.add_argument("--tp", type=int, default=None, help="default: the MPI world size")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--context", type=int, default=None, help="decode context (512 GPU, 128 CPU)")
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens (2048 GPU, 128 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (50 GPU, 10 CPU)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="also write the results here (rank 0)")
    return p.parse_args()


def world_size_from_env() -> int:
    for name in _SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def spawn_mpirun(tp: int) -> int:
    """Started alone with --tp N > 1: re-run this script as N ranks."""
    import subprocess

    from contract.mpirun import find_mpirun, mpi_launcher

    mpirun = find_mpirun()
    if mpirun is None:
        say("no mpirun found: install MPI or run under `mpirun -n N` yourself")
        return 2
    argv = [*mpi_launcher(mpirun), "-n", str(tp), sys.executable, *sys.argv]
    say("spawning: " + " ".join(argv))
    return subprocess.call(argv)


def model_config(shape: str) -> ModelConfig:
    vocab, hidden, inter, layers, heads, kv, tied, theta = SHAPES[shape]
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
        rms_norm_eps=1e-5, rope_theta=theta, max_position_embeddings=8192,
        tie_word_embeddings=tied, attention_bias=False,
    )  # fmt: skip


def full_tensor(name: str, shape: tuple[int, ...], seed: int, device, dtype) -> torch.Tensor:
    """The TP=1 value of parameter `name`: the same on every rank (seeded by name)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + sum(ord(c) * (i + 1) for i, c in enumerate(name)))
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
    return (torch.randn(shape, generator=gen, device=device) * std).to(dtype)


def build_model(cfg: ModelConfig, tp: TpGroup, device, dtype, seed: int, max_pos: int):
    """This rank's shard, filled from the full tensors through the engine's weight loaders."""
    with torch.device("meta"):
        full_shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg, 8).named_parameters()}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, max_pos, tp)
    finally:
        torch.set_default_dtype(previous)
    q, kv, inter = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape in full_shapes.items():
            full = full_tensor(name, shape, seed, device, dtype)
            param = params[name]
            if ".qkv_proj." in name:
                for piece, shard in zip(full.split([q, kv, kv]), "qkv", strict=True):
                    param.weight_loader(param, piece, shard)
            elif ".gate_up_proj." in name:
                for index, piece in enumerate(full.split([inter, inter])):
                    param.weight_loader(param, piece, index)
            elif hasattr(param, "weight_loader"):
                param.weight_loader(param, full)
            else:
                param.data.copy_(full)
            del full
    model.rotary = RotaryEmbedding(cfg.head_dim, max_pos, cfg.rope_theta, None).to(device)
    model.prepare_inference()  # the device path follows the weights' device and dtype
    return model.eval()


class Driver:
    """Rank 0's side: run a plan (broadcasting it first under TP) and time it."""

    def __init__(self, runner: ModelRunner, tp, device) -> None:
        self.runner, self.tp, self.device = runner, tp, device

    def run(self, plan: StepPlan) -> torch.Tensor | None:
        if self.tp is not None:
            self.tp.broadcast_object(plan)
        return self.runner.execute(plan)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_plan(self, plan: StepPlan, iters: int, warmup: int = 3) -> float:
        """Median seconds per step."""
        for _ in range(warmup):
            self.run(plan)
        times = []
        for _ in range(iters):
            self.sync()
            t0 = time.perf_counter()
            self.run(plan)
            self.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


def decode_plan(batch: int, context: int) -> StepPlan:
    per_seq = -(-(context + 1) // BLOCK)
    return StepPlan(
        input_ids=[7] * batch, positions=[context] * batch,
        decode_tables=[list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)],
        decode_lens=[context + 1] * batch, sample_rows=list(range(batch)),
    )  # fmt: skip


def prefill_plan(tokens: int, vocab: int) -> StepPlan:
    ids = [(i * 7919) % vocab for i in range(tokens)]
    table = list(range(-(-tokens // BLOCK)))
    return StepPlan(ids, list(range(tokens)), prefills=[(0, tokens, 0, table)],
                    sample_rows=[tokens - 1])  # fmt: skip


def greedy(driver: Driver, vocab: int, seed: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of PROMPTS random prompts (one batch) and their prefill logits."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (PROMPTS, PROMPT_LEN), generator=gen).tolist()
    per_seq = -(-(PROMPT_LEN + GREEDY_TOKENS) // BLOCK)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(PROMPTS)]
    plan = StepPlan()
    for i, prompt in enumerate(prompts):
        plan.input_ids += prompt
        plan.positions += list(range(PROMPT_LEN))
        plan.prefills.append((i * PROMPT_LEN, PROMPT_LEN, 0, tables[i]))
        plan.sample_rows.append((i + 1) * PROMPT_LEN - 1)
    logits = driver.run(plan)
    first = logits.float().cpu()
    tokens = [[t] for t in logits.argmax(-1).tolist()]
    for step in range(1, GREEDY_TOKENS):
        pos = PROMPT_LEN + step - 1
        plan = StepPlan(
            input_ids=[t[-1] for t in tokens], positions=[pos] * PROMPTS,
            decode_tables=tables, decode_lens=[pos + 1] * PROMPTS,
            sample_rows=list(range(PROMPTS)),
        )  # fmt: skip
        for row, token in enumerate(driver.run(plan).argmax(-1).tolist()):
            tokens[row].append(token)
    return tokens, first


def measure(driver: Driver, cfg: ModelConfig, args) -> dict:
    out = {}
    for batch in (1, 32):
        out[f"decode_b{batch}_ms"] = 1e3 * driver.time_plan(decode_plan(batch, args.context),
                                                            args.iters)  # fmt: skip
    t = driver.time_plan(prefill_plan(args.prefill, cfg.vocab_size), max(3, args.iters // 5), 1)
    out["prefill_tok_s"] = args.prefill / t
    out["tokens"], out["logits"] = greedy(driver, cfg.vocab_size, args.seed)
    if driver.tp is not None:  # the control channel alone: a batch-32 plan, no forward
        plan = decode_plan(32, args.context)
        for _ in range(5):
            driver.tp.broadcast_object(("noop", plan))
        t0 = time.perf_counter()
        for _ in range(100):
            driver.tp.broadcast_object(("noop", plan))
        out["plan_broadcast_us"] = (time.perf_counter() - t0) / 100 * 1e6
    return out


def make_runner(cfg, tp_group, device, dtype, args, tp_size: int) -> ModelRunner:
    max_pos = max(args.context + 2, args.prefill, PROMPT_LEN + GREEDY_TOKENS) + BLOCK
    model = build_model(cfg, tp_group, device, dtype, args.seed, max_pos)
    blocks = max(32 * -(-(args.context + 1) // BLOCK), -(-args.prefill // BLOCK),
                 PROMPTS * -(-(PROMPT_LEN + GREEDY_TOKENS) // BLOCK))  # fmt: skip
    return ModelRunner(model, KvCache(cfg, blocks, BLOCK, dtype, device, tp_size))


def quiet_barrier(comm) -> None:
    """A barrier that sleeps instead of spinning (MPI barriers busy-poll a CPU core)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.01)


def main() -> int:
    args = parse()
    world = world_size_from_env()
    tp_size = args.tp or world
    if world == 1 and tp_size > 1:
        return spawn_mpirun(tp_size)
    if world != tp_size:
        say(f"the MPI world has {world} ranks but --tp is {tp_size}")
        return 2
    from mpi4py import MPI

    from mpi_workers.engine.torch.tp import TpRuntime, pick_device

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    device = pick_device(args.device, comm)
    dtype = (torch.float32 if device.type == "cpu" else torch.bfloat16) if args.dtype == "auto" \
        else getattr(torch, args.dtype)  # fmt: skip
    gpu = device.type == "cuda"
    args.context = args.context or (512 if gpu else 128)
    args.prefill = args.prefill or (2048 if gpu else 128)
    args.iters = args.iters or (50 if gpu else 10)
    # Each rank gets its share of the cores (ranks of one host would otherwise oversubscribe).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
    cfg = model_config(args.shape)
    torch.set_grad_enabled(False)
    if rank == 0:
        mpi = MPI.Get_library_version().replace("\0", "").splitlines()[0]
        name = torch.cuda.get_device_name(device) if gpu else "cpu"
        say(
            f"shape {args.shape}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
            f"{cfg.num_heads} heads, {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}; "
            f"{dtype} on {device.type} ({name}); TP={tp_size}; torch {torch.__version__}; {mpi}"
        )
        say(
            f"decode context {args.context} tokens, prefill {args.prefill} tokens, "
            f"{args.iters} timed steps (median)"
        )
        t0 = time.perf_counter()
        runner = make_runner(cfg, TpGroup(), device, dtype, args, 1)
        say(f"TP=1 model built in {time.perf_counter() - t0:.1f} s; measuring")
        base = measure(Driver(runner, None, device), cfg, args)
        del runner
        if gpu:
            torch.cuda.empty_cache()
    if tp_size == 1:
        report(base, base, 1, args)
        return 0
    quiet_barrier(comm)
    tp = TpRuntime.init(comm, device)
    t0 = time.perf_counter()
    runner = make_runner(cfg, tp.group, device, dtype, args, tp_size)
    if rank != 0:
        while (plan := tp.broadcast_object()) is not None:
            if not isinstance(plan, tuple):  # ("noop", plan): control-channel timing
                runner.execute(plan)
        tp.close()
        return 0
    say(f"TP={tp_size} shard built in {time.perf_counter() - t0:.1f} s; measuring")
    result = measure(Driver(runner, tp, device), cfg, args)
    tp.broadcast_object(None)
    report(base, result, tp_size, args)
    tp.close()
    return 0


def report(base: dict, other: dict, n: int, args) -> None:
    for batch in (1, 32):
        a, b = base[f"decode_b{batch}_ms"], other[f"decode_b{batch}_ms"]
        say(f"decode step, batch {batch:2d}, context {args.context}: TP=1 {a:8.3f} ms | "
            f"TP={n} {b:8.3f} ms | speed-up TP={n}/TP=1 {a / b:5.2f}x")  # fmt: skip
    a, b = base["prefill_tok_s"], other["prefill_tok_s"]
    say(
        f"prefill {args.prefill} tokens: TP=1 {a:10.0f} tok/s | TP={n} {b:10.0f} tok/s | "
        f"speed-up TP={n}/TP=1 {b / a:5.2f}x"
    )
    diff = (base["logits"] - other["logits"]).abs().max().item()
    scale = base["logits"].abs().max().item()
    say(
        f"logits ({PROMPTS} prompts of {PROMPT_LEN} tokens, prefill): max |TP={n} - TP=1| = "
        f"{diff:.3g} (max |logit| {scale:.3g})"
    )
    if "plan_broadcast_us" in other:
        say(f"plan broadcast (batch 32 decode plan, gloo control group): "
            f"{other['plan_broadcast_us']:.0f} us per step")  # fmt: skip
    same = sum(x == y for p, q in zip(base["tokens"], other["tokens"], strict=True)
               for x, y in zip(p, q, strict=True))  # fmt: skip
    first = [next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), None)
             for p, q in zip(base["tokens"], other["tokens"], strict=True)]  # fmt: skip
    say(
        f"greedy tokens: {same}/{PROMPTS * GREEDY_TOKENS} equal TP={n} vs TP=1 "
        f"(first divergence per prompt: {first})"
    )
    summary = {
        "shape": args.shape, "tp": n,
        "decode_b1_ms": [base["decode_b1_ms"], other["decode_b1_ms"]],
        "decode_b32_ms": [base["decode_b32_ms"], other["decode_b32_ms"]],
        "prefill_tok_s": [base["prefill_tok_s"], other["prefill_tok_s"]],
        "plan_broadcast_us": other.get("plan_broadcast_us"),
        "max_logit_diff": diff, "greedy_equal": same, "greedy_total": PROMPTS * GREEDY_TOKENS,
    }  # fmt: skip
    say("RESULT " + json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

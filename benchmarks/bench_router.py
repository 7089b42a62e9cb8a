"""Routing policies compared on a prefix-heavy chat workload, with simulated (mocker) workers.

Part 1 (in one process, no HTTP): N `MockerEngine`s (real block managers, real KV events, the
timing model), a workload of multi-turn conversations over a few shared system prompts, and
the same conversations replayed under round_robin, least_loaded, kv and an oracle (the kv
cost function fed with every worker's true cache, instantly). The kv router is the real
`KvRouter` over the real `KvIndex`, fed through `KvIndexFeed` (seq checks, snapshots at start)
with the KV events delayed by `--event-delay-ms` (the NATS hop); load metrics reach the
`LoadTracker` every `--metrics-ms`, as the workers publish them. Times are simulated
milliseconds (wall time × speedup).

Part 2 (`--overhead`, on by default): the frontend's own cost. `hpcserve up`'s processes
(etcd, NATS, mocker workers with a zero-time model, the frontend with the kv router) started
through the launcher; 1-token completions by token ids: requests/s and latency p50, which is
all overhead since the engine takes no time.

    python benchmarks/bench_router.py [--workers 8] [--conversations 128] [--no-overhead]

The last line is `kv_vs_round_robin ttft_p50_speedup=<x> hit_rate_vs_oracle=<y>`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.block_hash import block_hashes
from contract.config import KvRouterConfig, MockerConfig, load_config
from contract.discovery import WorkerCard
from contract.messages import (
    GenerateRequest,
    KvEvent,
    KvEventBatch,
    KvSnapshot,
    SamplingParams,
)
from frontend.kv_index import KvIndex, KvIndexFeed
from frontend.kv_router import KvRouter
from frontend.router import LeastLoadedRouter, LoadTracker, RoundRobinRouter, Router
from mpi_workers.engine.mocker import MockerEngine, ModelShape

logger = logging.getLogger("bench_router")
VOCAB = 32000
BLOCK = 16


# ----- workload -----------------------------------------------------------------------------
@dataclass
class Conversation:
    system: list[int]
    user_turns: list[list[int]]
    start_ms: float
    think_ms: list[float]


def make_workload(args: argparse.Namespace) -> list[Conversation]:
    rng = random.Random(args.seed)
    systems = [
        [rng.randrange(3, VOCAB) for _ in range(args.system_tokens)] for _ in range(args.systems)
    ]
    conversations = []
    t = 0.0
    for _ in range(args.conversations):
        t += rng.expovariate(1.0 / args.arrival_ms)
        turns = [
            [rng.randrange(3, VOCAB) for _ in range(rng.randint(args.user_min, args.user_max))]
            for _ in range(args.turns)
        ]
        think = [rng.expovariate(1.0 / args.think_ms) for _ in range(args.turns)]
        conversations.append(Conversation(rng.choice(systems), turns, t, think))
    return conversations


# ----- one run ------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    ttft_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    seen_blocks: set[int] = field(default_factory=set)
    shared_tokens: int = 0  # prompt tokens in blocks some earlier request already had
    duration_ms: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / max(self.prompt_tokens, 1)

    @property
    def sharing(self) -> float:
        return self.shared_tokens / max(self.prompt_tokens, 1)

    def p(self, q: float) -> float:
        data = sorted(self.ttft_ms)
        return data[min(len(data) - 1, int(q * len(data)))]

    @property
    def throughput(self) -> float:
        """Output tokens per simulated second."""
        return self.output_tokens / max(self.duration_ms / 1000.0, 1e-9)


class OracleIndex(KvIndex):
    """A KvIndex that reads every engine's block manager: exact and instant."""

    def __init__(self, engines: dict[str, MockerEngine]) -> None:
        super().__init__()
        self._engines = engines

    def overlaps(self, hashes: Sequence[int], candidates: Collection[str]) -> dict[str, int]:
        scores = {}
        for worker_id in candidates:
            cached = self._engines[worker_id].block_manager._hash_to_block
            depth = 0
            for h in hashes:
                if h not in cached:
                    break
                depth += 1
            scores[worker_id] = depth
        return scores


def card_of(worker_id: str) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id, role="agg", model="mocker", block_size=BLOCK, subject="-",
        abort_subject="-", capacity=64, max_model_len=32768, simulated=True,
    )  # fmt: skip


async def run_policy(
    name: str, conversations: list[Conversation], args: argparse.Namespace
) -> Result:
    timing = MockerConfig(
        prefill_ms_per_token=args.prefill_ms_per_token,
        decode_ms_base=args.decode_ms_base,
        decode_ms_per_seq=args.decode_ms_per_seq,
        decode_ms_per_ctx_token=args.decode_ms_per_ctx_token,
        speedup=args.speedup,
    )
    speed = args.speedup
    engines = {
        f"mock-{i}": MockerEngine(
            timing,
            shape=ModelShape(vocab_size=VOCAB, max_position_embeddings=32768),
            block_size=BLOCK,
            num_blocks=args.num_blocks,
            max_num_seqs=64,
            max_num_batched_tokens=4096,
        )
        for i in range(args.workers)
    }
    cards = {worker_id: card_of(worker_id) for worker_id in engines}
    tracker = LoadTracker()
    loop = asyncio.get_running_loop()
    seqs = dict.fromkeys(engines, 0)
    feed: KvIndexFeed | None = None
    router: Router
    if name == "round_robin":
        router = RoundRobinRouter()
    elif name == "least_loaded":
        router = LeastLoadedRouter(tracker)
    elif name == "oracle":
        oracle_config = KvRouterConfig(block_size=BLOCK, overlap_score_weight=args.overlap_weight)
        router = KvRouter(oracle_config, OracleIndex(engines), tracker, seed=1)
    else:  # kv

        async def fetch(worker_id: str) -> KvSnapshot:
            hashes = engines[worker_id].cached_block_hashes()
            return KvSnapshot(worker_id=worker_id, seq=seqs[worker_id], block_hashes=hashes)

        feed = KvIndexFeed(KvIndex(), fetch, reconcile_interval_s=3600)
        kv_config = KvRouterConfig(block_size=BLOCK, overlap_score_weight=args.overlap_weight)
        router = KvRouter(kv_config, feed.index, tracker, seed=1)
        feed.on_workers_changed(cards)
        router.on_workers_changed(cards)

    for worker_id, engine in engines.items():
        if feed is not None:

            def sink(events: list[KvEvent], worker_id: str = worker_id) -> None:
                seqs[worker_id] += 1
                batch = KvEventBatch(worker_id=worker_id, seq=seqs[worker_id], events=events)
                loop.call_later(args.event_delay_ms / 1000.0, feed.handle_batch, batch)

            engine.set_kv_event_sink(sink)
        await engine.start()

    async def publish_metrics() -> None:
        while True:
            for worker_id, engine in engines.items():
                metrics = engine.load_metrics().model_copy(update={"worker_id": worker_id})
                tracker.update(metrics)
            await asyncio.sleep(args.metrics_ms / 1000.0)

    metrics_task = asyncio.create_task(publish_metrics())
    result = Result(name)
    counter = 0

    async def one_turn(prompt: list[int]) -> list[int]:
        nonlocal counter
        counter += 1
        request = GenerateRequest(
            request_id=f"{name}-{counter}",
            token_ids=prompt,
            sampling=SamplingParams(max_tokens=args.output_tokens, ignore_eos=True),
        )
        hashes = block_hashes(prompt, BLOCK)
        for h in hashes:
            if h not in result.seen_blocks:
                break
            result.shared_tokens += BLOCK
        result.seen_blocks.update(hashes)
        t0 = time.perf_counter()
        card = router.choose(list(cards.values()), request)
        tracker.started(card.worker_id)
        output: list[int] = []
        first = None
        try:
            async for out in engines[card.worker_id].generate(request):
                if out.token_ids and first is None:
                    first = time.perf_counter()
                output.extend(out.token_ids)
                if out.finish_reason is not None:
                    result.prompt_tokens += out.num_prompt_tokens
                    result.cached_tokens += out.num_cached_tokens
        finally:
            tracker.finished(card.worker_id, request.request_id)
        assert first is not None
        result.ttft_ms.append((first - t0) * 1000.0 * speed)
        result.output_tokens += len(output)
        return output

    async def converse(conv: Conversation) -> None:
        await asyncio.sleep(conv.start_ms / 1000.0 / speed)
        history = list(conv.system)
        for user, think in zip(conv.user_turns, conv.think_ms, strict=True):
            history.extend(user)
            history.extend(await one_turn(list(history)))
            await asyncio.sleep(think / 1000.0 / speed)

    t0 = time.perf_counter()
    await asyncio.gather(*(converse(conv) for conv in conversations))
    result.duration_ms = (time.perf_counter() - t0) * 1000.0 * speed
    metrics_task.cancel()
    if feed is not None:
        await feed.stop()
    for engine in engines.values():
        await engine.shutdown()
    return result


# ----- frontend overhead --------------------------------------------------------------------
async def measure_overhead(args: argparse.Namespace) -> tuple[float, float]:
    """Requests/s and latency p50 (ms) of 1-token completions through a real deployment."""
    import httpx

    from hpcserve.launcher import start_deployment, stop_deployment

    run_dir = Path(tempfile.mkdtemp(prefix="bench-router-"))
    config = load_config(
        overrides=[
            "name=bench-router",
            "engine.kind=mocker",
            "engine.mocker.prefill_ms_per_token=0",
            "engine.mocker.decode_ms_base=0",
            "engine.mocker.decode_ms_per_seq=0",
            "engine.mocker.decode_ms_per_ctx_token=0",
            f"workers.0.count={args.overhead_workers}",
            "frontend.router=kv",
            "frontend.port=0",
            f"run_dir={run_dir}",
        ],
        environ={},
    )
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    try:
        rng = random.Random(3)
        prompts = [[rng.randrange(3, 40000) for _ in range(64)] for _ in range(64)]
        limits = httpx.Limits(max_connections=args.overhead_concurrency)
        async with httpx.AsyncClient(base_url=deployment.url, timeout=60, limits=limits) as client:

            async def one(i: int) -> float:
                t0 = time.perf_counter()
                body = {"prompt": prompts[i % len(prompts)], "max_tokens": 1}
                response = await client.post("/completions", json=body)
                response.raise_for_status()
                return time.perf_counter() - t0

            for i in range(20):  # warm-up, and a sequential latency sample
                await one(i)
            sequential = [await one(i) for i in range(100)]
            semaphore = asyncio.Semaphore(args.overhead_concurrency)

            async def bounded(i: int) -> float:
                async with semaphore:
                    return await one(i)

            t0 = time.perf_counter()
            await asyncio.gather(*(bounded(i) for i in range(args.overhead_requests)))
            rps = args.overhead_requests / (time.perf_counter() - t0)
        return rps, statistics.median(sequential) * 1000.0
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)


# ----- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--workers", type=int, default=8)
    add("--conversations", type=int, default=96)
    add("--turns", type=int, default=10)
    add("--systems", type=int, default=8, help="distinct shared system prompts")
    add("--system-tokens", type=int, default=1024)
    add("--user-min", type=int, default=64)
    add("--user-max", type=int, default=256)
    add("--output-tokens", type=int, default=32)
    add("--arrival-ms", type=float, default=150.0, help="mean gap between new conversations")
    add("--think-ms", type=float, default=300.0, help="mean pause between turns")
    add("--num-blocks", type=int, default=4096, help="KV blocks per worker")
    add("--prefill-ms-per-token", type=float, default=0.2)
    add("--decode-ms-base", type=float, default=5.0)
    add("--decode-ms-per-seq", type=float, default=0.1)
    add("--decode-ms-per-ctx-token", type=float, default=0.0001)
    add("--speedup", type=float, default=1.0)
    add("--event-delay-ms", type=float, default=2.0, help="wall ms; the NATS hop")
    add("--metrics-ms", type=float, default=50.0, help="wall ms between load reports")
    add("--seed", type=int, default=0)
    add(
        "--overlap-weight", type=float, default=8.0,
        help="frontend.kv_router.overlap_score_weight for the kv and oracle runs (a kv run at "
        "the config default 1.0 is shown too)",
    )  # fmt: skip
    add("--overhead", action=argparse.BooleanOptionalAction, default=True)
    add("--overhead-workers", type=int, default=2)
    add("--overhead-requests", type=int, default=600)
    add("--overhead-concurrency", type=int, default=32)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> None:
    conversations = make_workload(args)
    results: dict[str, Result] = {}
    runs = [("round_robin", args), ("least_loaded", args), ("kv", args), ("oracle", args)]
    if args.overlap_weight != 1.0:
        runs.insert(3, ("kv(w=1.0)", argparse.Namespace(**{**vars(args), "overlap_weight": 1.0})))
    for name, run_args in runs:
        t0 = time.perf_counter()
        results[name] = await run_policy(name, conversations, run_args)
        logger.info("%s done in %.1f s wall", name, time.perf_counter() - t0)
    any_result = results["round_robin"]
    logger.info(
        "workload: %d workers, %d conversations x %d turns over %d system prompts of %d "
        "tokens; prefix-sharing ratio %.3f (prompt tokens in blocks an earlier request had); "
        "kv and oracle with overlap_score_weight %.1f",
        args.workers, args.conversations, args.turns, args.systems, args.system_tokens,
        any_result.sharing, args.overlap_weight,
    )  # fmt: skip
    header = (
        f"{'policy':<13} {'hit_rate':>8} {'ttft_p50_ms':>11} {'ttft_p90_ms':>11} "
        f"{'tok/s(sim)':>10} {'requests':>8}"
    )
    lines = [header]
    for name, r in results.items():
        lines.append(
            f"{name:<13} {r.hit_rate:>8.3f} {r.p(0.5):>11.1f} {r.p(0.9):>11.1f} "
            f"{r.throughput:>10.0f} {len(r.ttft_ms):>8d}"
        )
    logger.info("results (simulated time)\n%s", "\n".join(lines))
    rr, kv, oracle = results["round_robin"], results["kv"], results["oracle"]
    logger.info(
        "kv/round_robin: hit rate x%.2f, ttft p50 speedup x%.2f, p90 speedup x%.2f, "
        "throughput x%.2f; oracle hit rate %.3f",
        kv.hit_rate / max(rr.hit_rate, 1e-9), rr.p(0.5) / kv.p(0.5), rr.p(0.9) / kv.p(0.9),
        kv.throughput / rr.throughput, oracle.hit_rate,
    )  # fmt: skip
    if args.overhead:
        rps, p50 = await measure_overhead(args)
        logger.info(
            "frontend overhead (%d zero-time mocker workers, kv router, HTTP + NATS): "
            "%.0f requests/s at concurrency %d; added latency p50 %.2f ms (1-token request)",
            args.overhead_workers, rps, args.overhead_concurrency, p50,
        )  # fmt: skip
    speedup = rr.p(0.5) / kv.p(0.5)
    vs_oracle = kv.hit_rate / max(oracle.hit_rate, 1e-9)
    sys.stdout.write(
        f"kv_vs_round_robin ttft_p50_speedup={speedup:.2f} hit_rate_vs_oracle={vs_oracle:.3f}\n"
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("frontend").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    main()

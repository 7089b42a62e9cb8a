"""Routing policies compared on prefix-heavy chat workloads, with simulated (mocker) workers.

Part 1, through HTTP (the default): for each workload and policy, a local deployment of
`configs/local-mocker-kv.yaml` started through hpcserve's launcher (etcd, NATS, 8 mocker
workers with real block managers and KV events, the frontend) with `frontend.router` set to
the policy, and an async client streaming chat requests, `--concurrency` at a time:

- system_prompts: each request one of `--http-systems` long system prompts (~3,400 tokens)
  plus a short unique question (the workload of issue 14);
- multi_turn: conversations whose every turn resends the whole history, after the user's
  think time (exponential, mean `--http-think-ms` of model time, before every turn);
- multi_turn_lockstep: the same conversations with no think time (the workload until issue
  14's second round, kept to compare; not run by default). All lanes start together and
  never pause, so two conversations sharing a worker send their turns into the same engine
  step, finish together and do it again, turn after turn: each hit waits for the other's
  prefill (in-process replay: a hit arriving alone 84 ms, with its partner 165 ms), which
  no placement can avoid once a conversation is cached where it is (real users pause);
- small_cache: system_prompts' requests on workers caching `--http-small-cache-blocks`
  blocks each (1,000; system_prompts' workers cache 1,400). The prompts hold 6,784
  distinct full blocks (at 160 requests; 32 system prompts of 207 blocks and the
  questions'): one cache holds 15% of them (4.8 of the 32 prompts), all eight together
  1.18x, so the router must partition the prompts across the workers (a prompt duplicated
  on a second worker evicts another one there) and balance the load while doing so. Until
  issue 14's third round the workers cached 700 blocks each: 5,600 together, fewer than
  the prompts' blocks, so some prompt was evicted whatever the router did: an in-process
  replay placing each system prompt on one worker (prompt i on worker i mod 8, no router)
  reached x1.42 of round robin there (x23 at 1,000 blocks). The run logs each workload's
  working set against the caches;
- no_prefix: every prompt unique, each after a user's think time as in multi_turn (the router
  must not lose to round robin here); no_prefix_lockstep: the same prompts with no pause (the
  workload until the second round of issue 14; not run by default).

Each worker caches `--http-num-blocks` blocks: a few system prompts, far fewer than all.
TTFT is wall time to the first streamed token; the hit rate is cached / prompt tokens as the
frontend reports them (`usage.prompt_tokens_details.cached_tokens`); the oracle hit rate is
the tokens in blocks some earlier request of the run already had (no router can hit more).

Part 2 (`--inproc`): the same router in one process without HTTP (N `MockerEngine`s, KV
events delayed by `--event-delay-ms`, simulated time), with an exact-cache oracle router.

    python benchmarks/bench_router.py [--workers 8] [--inproc]

The table gives each run's TTFT p50, mean and `at_floor`, the share of requests within 1.25x
of the workload's prefill floor (its 5th percentile TTFT over all policies): with prompts
sharing nothing in lockstep TTFT has two humps (nothing ahead / one prefill ahead) and the
p50 falls on the edge between them, so the mean and that share say which policy made requests
wait (`benchmarks/replay_lockstep.py` replays that workload in simulated time).

The last line is `router kv_vs_rr_ttft_p50=<x> multi_turn_ratio=<m> small_cache_ratio=<c>
hit_rate_vs_oracle=<y> no_prefix_ratio=<z> no_prefix_lockstep_mean_ratio=<w>`: round-robin
TTFT p50 / kv TTFT p50 on system_prompts, multi_turn, small_cache and no_prefix (> 1: kv
faster; nan: not run), kv's hit rate / the oracle's, the lower of system_prompts and
multi_turn (small_cache's oracle ignores the capacity, so it is left out), and round robin's
mean TTFT / kv's on no_prefix_lockstep.

With `--repeat N` (N >= 2) each policy's rounds are paired with round robin's of the same round
and summarised (`benchmarks/round_stats.py`): `<workload> <policy>_vs_rr p50|mean median=<x>
ci95=[a,b] control=[c,d] ... verdict=worse|within|better`, the control being a policy that is
round robin under another name (`--policies 'round_robin;kv;round_robin:'`): round robin's
spread against itself, measured the same way. Many short rounds settle what one long round
cannot (e.g. `--repeat 20 --http-requests 96 --http-speedup 4`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import round_stats
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
from frontend.__main__ import DEBUG_LOGGERS_ENV
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

    def prefix_depths(self, hashes: Sequence[int]) -> dict[str, int]:
        depths = {}
        for worker_id, engine in self._engines.items():
            cached = engine.block_manager._hash_to_block
            depth = 0
            for h in hashes:
                if h not in cached:
                    break
                depth += 1
            if depth:
                depths[worker_id] = depth
        return depths


def mocker_engines(
    timing: MockerConfig, ids: Sequence[str], num_blocks: int, max_num_batched_tokens: int
) -> dict[str, MockerEngine]:
    """In-process simulated workers (this script's vocabulary and block size), by id."""
    return {
        worker_id: MockerEngine(
            timing,
            shape=ModelShape(vocab_size=VOCAB, max_position_embeddings=32768),
            block_size=BLOCK,
            num_blocks=num_blocks,
            max_num_seqs=64,
            max_num_batched_tokens=max_num_batched_tokens,
        )
        for worker_id in ids
    }


def card_of(worker_id: str) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id, role="agg", model="mocker", block_size=BLOCK, subject="-",
        abort_subject="-", capacity=64, max_model_len=32768, simulated=True,
    )  # fmt: skip


@dataclass
class SimulatedRouting:
    """A policy's router over in-process mockers, fed as a frontend's is: KV events after
    `event_delay_ms`, load reports every `metrics_ms` (this script's in-process run and
    replay_lockstep.py)."""

    router: Router
    tracker: LoadTracker
    feed: KvIndexFeed | None
    reporter: asyncio.Task[None]

    async def stop(self) -> None:
        self.reporter.cancel()
        if self.feed is not None:
            await self.feed.stop()


async def start_routing(
    policy: str,
    engines: dict[str, MockerEngine],
    kv_settings: dict[str, Any],
    event_delay_ms: float,
    metrics_ms: float,
    clock: Callable[[], float] | None = None,
) -> SimulatedRouting:
    """`policy`: round_robin, least_loaded, oracle (the KV router over the engines' exact
    caches) or kv (over the index their KV events build); the engines are started."""
    cards = {worker_id: card_of(worker_id) for worker_id in engines}
    tracker = LoadTracker()
    loop = asyncio.get_running_loop()
    seqs = dict.fromkeys(engines, 0)
    clocked: dict[str, Any] = {} if clock is None else {"clock": clock}
    feed: KvIndexFeed | None = None
    router: Router
    if policy == "round_robin":
        router = RoundRobinRouter()
    elif policy == "least_loaded":
        router = LeastLoadedRouter(tracker)
    elif policy == "oracle":
        config = KvRouterConfig(**kv_settings)
        router = KvRouter(config, OracleIndex(engines), tracker, seed=1, **clocked)
    else:  # kv

        async def fetch(worker_id: str) -> KvSnapshot:
            hashes = engines[worker_id].cached_block_hashes()
            return KvSnapshot(worker_id=worker_id, seq=seqs[worker_id], block_hashes=hashes)

        feed = KvIndexFeed(KvIndex(), fetch, reconcile_interval_s=3600)
        config = KvRouterConfig(**kv_settings)
        router = KvRouter(config, feed.index, tracker, seed=1, **clocked)
        feed.on_workers_changed(cards)
        router.on_workers_changed(cards)

    for worker_id, engine in engines.items():
        if feed is not None:

            def sink(
                events: list[KvEvent], worker_id: str = worker_id, feed: KvIndexFeed = feed
            ) -> None:
                seqs[worker_id] += 1
                batch = KvEventBatch(worker_id=worker_id, seq=seqs[worker_id], events=events)
                loop.call_later(event_delay_ms / 1000.0, feed.handle_batch, batch)

            engine.set_kv_event_sink(sink)
        await engine.start()

    async def report_load() -> None:
        while True:
            for worker_id, engine in engines.items():
                tracker.update(engine.load_metrics().model_copy(update={"worker_id": worker_id}))
            await asyncio.sleep(metrics_ms / 1000.0)

    return SimulatedRouting(router, tracker, feed, asyncio.create_task(report_load()))


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
    ids = [f"mock-{i}" for i in range(args.workers)]
    engines = mocker_engines(timing, ids, args.num_blocks, max_num_batched_tokens=4096)
    cards = {worker_id: card_of(worker_id) for worker_id in engines}
    routing = await start_routing(
        name, engines, args.kv_settings, args.event_delay_ms, args.metrics_ms
    )
    router, tracker = routing.router, routing.tracker
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
                    tracker.prefilled(request.request_id)  # as the frontend's RequestStream
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
    await routing.stop()
    for engine in engines.values():
        await engine.shutdown()
    return result


# ----- through HTTP -------------------------------------------------------------------------
WORDS = (  # noqa: SIM905 - a word list reads best as text
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "what if will each about how up out them then many some so these would other into "
    "more time could two like him see now long very only over new sound take little work "
    "know place year live me back give most good man think say great where help through "
    "much before line right too mean old any same tell boy follow came want show also "
    "around form three small set put end does another well large must big even such "
    "because turn"
).split()


@dataclass
class HttpChat:
    """One chat request of a workload: its messages, and which conversation it continues."""

    messages: list[dict[str, str]]
    conversation: int | None = None  # multi-turn: the next turn waits for this one
    think_s: float = 0.0  # wall seconds the client waits before sending it (user think time)


@dataclass
class HttpResult:
    name: str
    ttft_ms: list[float] = field(default_factory=list)
    hit_ttft_ms: list[float] = field(default_factory=list)  # of requests with a cache hit
    prompt_tokens: int = 0
    cached_tokens: int = 0
    oracle_tokens: int = 0  # prompt tokens in blocks an earlier request of the run already had
    duration_s: float = 0.0
    round_p50_ms: list[float] = field(default_factory=list)  # each round's own TTFT p50
    round_mean_ms: list[float] = field(default_factory=list)  # and its mean TTFT
    frontend_cpu_s: float = 0.0  # CPU the frontend process used during the requests
    workers_cpu_s: float = 0.0  # and the worker processes, together
    frontend_log: Path | None = None  # the deployment's frontend log (kept after it stops)
    records: list[dict[str, float]] = field(default_factory=list)  # one per request (--dump)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / max(self.prompt_tokens, 1)

    @property
    def oracle_hit_rate(self) -> float:
        return self.oracle_tokens / max(self.prompt_tokens, 1)

    def p(self, q: float) -> float:
        data = sorted(self.ttft_ms)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ttft_ms) if self.ttft_ms else float("nan")

    def at_floor(self, floor_ms: float) -> float:
        """The share of requests whose TTFT is within 1.25x of `floor_ms` (the workload's
        fastest, see `_floors`): nothing, or little, ahead of them on their worker."""
        return sum(t <= 1.25 * floor_ms for t in self.ttft_ms) / max(len(self.ttft_ms), 1)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def http_workloads(args: argparse.Namespace) -> dict[str, list[list[HttpChat]]]:
    """Each workload: a list of request chains (a chain's requests run in order, chains
    concurrently up to --concurrency)."""
    rng = random.Random(args.seed)
    systems = [f"System prompt {i}. " + _text(rng, args.http_system_words)
               for i in range(args.http_systems)]  # fmt: skip
    shared = [
        [HttpChat([{"role": "system", "content": rng.choice(systems)},
                   {"role": "user", "content": f"Question {i}: {_text(rng, 12)}?"}])]
        for i in range(args.http_requests)
    ]  # fmt: skip
    turns, lockstep = [], []
    per = max(1, args.http_requests // args.http_turns)
    think = random.Random(args.seed + 1)  # its own: the texts stay those of think time 0
    mean_think_s = args.http_think_ms / 1000.0 / args.http_speedup
    for c in range(per):
        chain, still = [], []
        history: list[dict[str, str]] = [
            {"role": "system", "content": f"Conversation {c}. " + _text(rng, 300)}
        ]
        for _ in range(args.http_turns):
            history = [*history, {"role": "user", "content": _text(rng, 120)}]
            pause = think.expovariate(1.0 / mean_think_s) if mean_think_s > 0 else 0.0
            chain.append(HttpChat(list(history), conversation=c, think_s=pause))
            still.append(HttpChat(list(history), conversation=c))
            history = [*history, {"role": "assistant", "content": _text(rng, args.max_tokens)}]
        turns.append(chain)
        lockstep.append(still)
    unique = [
        [HttpChat([{"role": "system",
                    "content": f"Unique {i}. " + _text(rng, args.http_system_words)},
                   {"role": "user", "content": _text(rng, 12)}])]
        for i in range(args.http_requests)
    ]  # fmt: skip
    unique_paced = [  # the same prompts, each after a user's pause
        [HttpChat(chain[0].messages, think_s=think.expovariate(1.0 / mean_think_s))]
        if mean_think_s > 0 else chain
        for chain in unique
    ]  # fmt: skip
    return {
        "system_prompts": shared,
        "multi_turn": turns,
        "multi_turn_lockstep": lockstep,
        "small_cache": shared,
        "no_prefix": unique_paced,
        "no_prefix_lockstep": unique,
    }


def working_set_blocks(workload: list[list[HttpChat]], tokenizer: object, block_size: int) -> int:
    """The distinct full prompt blocks of a workload: what all caches together must hold
    for every repeated prefix to stay cached (each worker's cache holding a share of it)."""
    return len({
        h for chain in workload for chat in chain
        for h in block_hashes(tokenizer.encode_chat(chat.messages), block_size)  # type: ignore[attr-defined]
    })  # fmt: skip


def policy_overrides(policy: str) -> tuple[str, list[str]]:
    """`kv:tie_band=0,prefill_load_scale=8` -> ("kv", [frontend.kv_router.tie_band=0, ...]):
    a policy with kv_router settings of its own (to compare settings in one run); a trailing
    `@N` runs it with N frontend processes (`round_robin@1`: frontend.workers=1)."""
    policy, _, processes = policy.partition("@")
    router, _, settings = policy.partition(":")
    overrides = [f"frontend.kv_router.{kv}" for kv in settings.split(",") if kv]
    if processes:
        overrides.append(f"frontend.workers={int(processes)}")
    return router, overrides


async def run_http_policy(
    policy: str,
    workload: list[list[HttpChat]],
    args: argparse.Namespace,
    tokenizer: object,
    num_blocks: int | None = None,
) -> HttpResult:
    """Start the mocker deployment with `frontend.router` (and kv_router settings) of
    `policy`, run `workload`, stop it."""
    import httpx

    from hpcserve.launcher import start_deployment, stop_deployment

    router, policy_settings = policy_overrides(policy)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-router-{router}-"))
    logger.debug("%s: deployment logs in %s/logs", policy, run_dir)
    overrides = [
        "name=bench-router-http",
        f"frontend.router={router}",
        "frontend.port=0",
        f"engine.mocker.prefill_ms_per_token={args.http_prefill_ms_per_token}",
        f"engine.mocker.speedup={args.http_speedup}",
        f"engine.num_blocks={num_blocks or args.http_num_blocks}",
        f"workers.0.count={args.workers}",
        f"run_dir={run_dir}",
        *args.set,
        *policy_settings,  # after --set: the policy's own win
    ]
    config = load_config(args.config, overrides=overrides, environ={})
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    result = HttpResult(policy)
    seen: set[int] = set()
    try:
        limits = httpx.Limits(max_connections=args.concurrency + 4)
        async with httpx.AsyncClient(base_url=deployment.url, timeout=600, limits=limits) as client:
            await _wait_workers(client, deployment.url, args.workers)
            chains = iter(workload)
            size = config.engine.block_size
            hashes_of = {  # before the clock starts: the client's CPU is the frontend's too
                id(chat): block_hashes(tokenizer.encode_chat(chat.messages), size)  # type: ignore[attr-defined]
                for chain in workload for chat in chain
            }  # fmt: skip

            async def one(chat: HttpChat) -> None:
                hashes = hashes_of[id(chat)]
                known = 0
                for h in hashes:
                    if h not in seen:
                        break
                    known += 1
                seen.update(hashes)
                body = {"messages": chat.messages, "max_tokens": args.max_tokens,
                        "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
                t0 = time.perf_counter()
                first = None
                usage = None
                response_id = ""
                async with client.stream("POST", "/chat/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk.get("choices"):
                            first = time.perf_counter()
                            response_id = chunk.get("id", "")
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                assert first is not None and usage is not None
                result.ttft_ms.append((first - t0) * 1000.0)
                result.prompt_tokens += usage["prompt_tokens"]
                details = usage.get("prompt_tokens_details") or {}
                result.cached_tokens += details.get("cached_tokens", 0)
                if details.get("cached_tokens", 0):
                    result.hit_ttft_ms.append((first - t0) * 1000.0)
                result.records.append({
                    "start_s": t0 - started, "ttft_ms": (first - t0) * 1000.0,
                    "prompt": usage["prompt_tokens"], "cached": details.get("cached_tokens", 0),
                    "known": known * size,
                    "conversation": -1 if chat.conversation is None else chat.conversation,
                    "id": response_id,
                })  # fmt: skip
                result.oracle_tokens += min(known * config.engine.block_size,
                                            usage["prompt_tokens"] - 1)  # fmt: skip

            async def lane() -> None:
                for chain in chains:
                    for chat in chain:
                        if chat.think_s:
                            await asyncio.sleep(chat.think_s)
                        await one(chat)

            cpu0 = _cpu_seconds(deployment)
            t0 = started = time.perf_counter()
            await asyncio.gather(*(lane() for _ in range(args.concurrency)))
            result.duration_s = time.perf_counter() - t0
            cpu1 = _cpu_seconds(deployment)
            result.frontend_cpu_s = cpu1[0] - cpu0[0]
            result.workers_cpu_s = cpu1[1] - cpu0[1]
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)
    result.frontend_log = run_dir / "logs" / "frontend.log"
    return result


def _cpu_seconds(deployment: object) -> tuple[float, float]:
    """(frontend, workers) CPU seconds so far: a policy that costs CPU on this shared
    machine slows everything else, which the TTFT alone would not tell apart."""
    import psutil

    frontend = workers = 0.0
    for planned, process in deployment.processes:  # type: ignore[attr-defined]
        used = 0.0
        try:
            root = psutil.Process(process.pid)
            for proc in [root, *root.children(recursive=True)]:  # mpirun's ranks too
                times = proc.cpu_times()
                used += times.user + times.system
        except psutil.Error:
            continue
        if planned.name.startswith("frontend"):
            frontend += used
        elif planned.name.startswith("worker"):
            workers += used
    return frontend, workers


async def _wait_workers(client: object, url: str, workers: int) -> None:
    """Until /health counts every worker (the launcher waits for the frontend only)."""
    deadline = time.monotonic() + 120
    health = url.removesuffix("/v1") + "/health"
    while True:
        response = await client.get(health)  # type: ignore[attr-defined]
        if response.status_code == 200 and response.json().get("workers", 0) >= workers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers did not register within 120 s")
        await asyncio.sleep(0.2)


# ----- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--workers", type=int, default=8)
    add("--concurrency", type=int, default=16, help="HTTP: requests in flight")
    add("--max-tokens", type=int, default=16, help="HTTP: output tokens per request")
    add(
        "--config",
        default=str(Path(__file__).resolve().parents[1] / "configs/local-mocker-kv.yaml"),
    )
    add("--set", action="append", default=[], help="HTTP: extra config overrides key=value")
    add("--http-systems", type=int, default=32)
    add("--http-system-words", type=int, default=3300, help="~3,400 tokens")
    add("--http-requests", type=int, default=240)
    add("--http-turns", type=int, default=6)
    add(
        "--http-think-ms",
        type=float,
        default=1000.0,
        help="multi_turn: mean user think time before each turn, in model time (wall time "
        "x --http-speedup)",
    )
    add("--http-prefill-ms-per-token", type=float, default=0.5)
    add("--http-num-blocks", type=int, default=1400, help="KV blocks per worker")
    add(
        "--http-small-cache-blocks",
        type=int,
        default=1000,
        help="small_cache: KV blocks per worker (all together must hold the working set)",
    )
    add("--http-speedup", type=float, default=1.0)
    add("--workloads", default="system_prompts,multi_turn,small_cache,no_prefix")
    add("--repeat", type=int, default=1, help="HTTP: rounds, rotating the policy order")
    add(
        "--policies",
        default="round_robin;kv",
        help="HTTP: ';'-separated; `kv:key=value,...` adds kv_router settings, `@N` runs N "
        "frontend processes (e.g. 'round_robin;kv;kv:tie_band=0;round_robin@1'; the others "
        "get frontend.workers as --set or the config says: null, one per spare core)",
    )
    add("--dump", help="HTTP: write each run's per-request records (JSON) into this folder")
    add(
        "--router-log",
        action="store_true",
        help="HTTP, with --dump: the frontend logs the KV router's decisions and each "
        "request's timeline (frontend.kv_router, frontend.timeline at debug level), copied "
        "beside each run's records (benchmarks/router_timeline.py reads them)",
    )
    add("--http", action=argparse.BooleanOptionalAction, default=True)
    add("--inproc", action=argparse.BooleanOptionalAction, default=False)
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
    args = parser.parse_args(argv)
    args.kv_settings = {}  # in-process: the config defaults, as a user gets them
    return args


def _floors(results: dict[str, HttpResult]) -> dict[str, float]:
    """Each workload's prefill floor: the 5th percentile TTFT over all its policies' requests
    (a request with nothing ahead of it; the minimum would be one lucky request)."""
    pooled: dict[str, list[float]] = {}
    for name, r in results.items():
        pooled.setdefault(name.split("/")[0], []).extend(r.ttft_ms)
    return {workload: sorted(ttfts)[int(0.05 * len(ttfts))] for workload, ttfts in pooled.items()}


def _table(results: dict[str, HttpResult]) -> str:
    """`at_floor`: the share of requests within 1.25x of the workload's prefill floor. With
    prompts sharing nothing in lockstep, TTFT is two humps (nothing ahead / one prefill
    ahead) and the p50 falls on the edge between them: the mean and this share say which
    policy made requests wait (issue 14, fourth round)."""
    floors = _floors(results)
    lines = [
        f"{'workload/policy':<36} {'hit_rate':>8} {'oracle':>7} {'ttft_p50_ms':>11} "
        f"{'ttft_mean':>9} {'at_floor':>8} {'ttft_p90_ms':>11} {'hit_ttft_p50':>12} "
        f"{'requests':>8} {'wall_s':>7} {'fe_cpu_s':>8} {'wk_cpu_s':>8}"
    ]
    for name, r in results.items():
        hit_p50 = statistics.median(r.hit_ttft_ms) if r.hit_ttft_ms else float("nan")
        lines.append(
            f"{name:<36} {r.hit_rate:>8.3f} {r.oracle_hit_rate:>7.3f} {r.p(0.5):>11.0f} "
            f"{r.mean:>9.0f} {r.at_floor(floors[name.split('/')[0]]):>8.2f} "
            f"{r.p(0.9):>11.0f} {hit_p50:>12.0f} {len(r.ttft_ms):>8d} {r.duration_s:>7.1f} "
            f"{r.frontend_cpu_s:>8.1f} {r.workers_cpu_s:>8.1f}"
        )
    return "\n".join(lines)


def _per_round(results: dict[str, HttpResult], what: str) -> dict[str, dict[str, list[float]]]:
    """Round robin's TTFT p50 (or mean) / each other policy's, one ratio per round, per
    workload: the rounds round_stats summarises."""
    per_round: dict[str, dict[str, list[float]]] = {}
    for name, r in results.items():
        workload, policy = name.split("/", 1)
        rr = results[f"{workload}/round_robin"]
        if policy == "round_robin":
            continue
        ours, theirs = (r.round_p50_ms, rr.round_p50_ms) if what == "p50" else (
            r.round_mean_ms, rr.round_mean_ms)  # fmt: skip
        per_round.setdefault(workload, {})[policy] = [
            a / b for a, b in zip(theirs, ours, strict=True)
        ]
    return per_round


async def http_main(args: argparse.Namespace) -> dict[str, float]:
    from contract.config import default_model_dir
    from frontend.tokenization import TextTokenizer

    model = load_config(args.config, overrides=args.set, environ={}).model.path
    tokenizer = TextTokenizer(str(model or default_model_dir()))
    workloads = http_workloads(args)
    if args.router_log:  # the deployments' frontends inherit it (python -m frontend)
        os.environ[DEBUG_LOGGERS_ENV] = "frontend.kv_router,frontend.timeline"
    policies = args.policies.split(";")
    if "round_robin" not in policies:
        raise SystemExit("--policies: needs round_robin (every ratio is against it)")
    results: dict[str, HttpResult] = {}
    block_size = load_config(args.config, overrides=args.set, environ={}).engine.block_size
    for workload in args.workloads.split(","):
        blocks = args.http_small_cache_blocks if workload == "small_cache" else args.http_num_blocks
        needed = working_set_blocks(workloads[workload], tokenizer, block_size)
        logger.info(
            "%s: working set %d prompt blocks; caches %d x %d = %d blocks (%.2fx the working "
            "set, one worker %.2fx)",
            workload, needed, args.workers, blocks, args.workers * blocks,
            args.workers * blocks / needed, blocks / needed,
        )  # fmt: skip
    # rotating order: a machine whose load drifts (other jobs) skews every policy alike
    for round_ in range(args.repeat):
        for workload in args.workloads.split(","):
            shift = round_ % len(policies)
            for policy in policies[shift:] + policies[:shift]:
                t0 = time.perf_counter()
                blocks = args.http_small_cache_blocks if workload == "small_cache" else None
                one = await run_http_policy(
                    policy, workloads[workload], args, tokenizer, num_blocks=blocks
                )
                logger.info("%s/%s round %d: ttft p50 %.0f ms, hit rate %.3f (%.1f s)",
                            workload, policy, round_, one.p(0.5), one.hit_rate,
                            time.perf_counter() - t0)  # fmt: skip
                merged = results.setdefault(f"{workload}/{policy}", HttpResult(policy))
                merged.ttft_ms += one.ttft_ms
                merged.hit_ttft_ms += one.hit_ttft_ms
                merged.prompt_tokens += one.prompt_tokens
                merged.cached_tokens += one.cached_tokens
                merged.oracle_tokens += one.oracle_tokens
                merged.duration_s += one.duration_s
                merged.frontend_cpu_s += one.frontend_cpu_s
                merged.workers_cpu_s += one.workers_cpu_s
                merged.round_p50_ms.append(one.p(0.5))
                merged.round_mean_ms.append(one.mean)
                if args.dump:
                    path = Path(args.dump) / f"{workload}-{policy}-{round_}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(one.records))
                    if args.router_log and one.frontend_log and one.frontend_log.exists():
                        shutil.copy(one.frontend_log, path.with_suffix(".frontend.log"))
    logger.info(
        "through HTTP: %d mocker workers (%d KV blocks each, prefill %.2f ms/token), %d "
        "streaming chat requests per workload and round (%d), %d at a time, %d output "
        "tokens\n%s",
        args.workers, args.http_num_blocks, args.http_prefill_ms_per_token, args.http_requests,
        args.repeat, args.concurrency, args.max_tokens, _table(results),
    )  # fmt: skip

    def ratio(workload: str, policy: str = "kv", mean: bool = False) -> float:
        rr, other = results.get(f"{workload}/round_robin"), results.get(f"{workload}/{policy}")
        if not rr or not other:
            return float("nan")
        return rr.mean / other.mean if mean else rr.p(0.5) / other.p(0.5)

    lines = []
    for name, r in results.items():
        workload, policy = name.split("/", 1)
        if policy == "round_robin":
            continue
        rr = results[f"{workload}/round_robin"]
        per_round = [a / b for a, b in zip(rr.round_p50_ms, r.round_p50_ms, strict=True)]
        means = [a / b for a, b in zip(rr.round_mean_ms, r.round_mean_ms, strict=True)]
        lines.append(f"{name:<40} p50 x{ratio(workload, policy):.2f} (rounds "
                     + " ".join(f"x{x:.2f}" for x in per_round)
                     + f"), mean x{ratio(workload, policy, mean=True):.2f} (rounds "
                     + " ".join(f"x{x:.2f}" for x in means) + ")")  # fmt: skip
    logger.info("TTFT, round_robin / policy (> 1: faster than round robin), pooled and "
                "per round:\n%s", "\n".join(lines))  # fmt: skip
    if args.repeat >= 2:
        control = next((p for p in policies if p != "round_robin"
                        and policy_overrides(p) == ("round_robin", [])), "")  # fmt: skip
        for what, per_round in (("p50", _per_round(results, "p50")),
                                ("mean", _per_round(results, "mean"))):  # fmt: skip
            for line in round_stats.verdict_lines(per_round, control, what):
                sys.stdout.write(line + "\n")
    vs_oracle = [
        r.hit_rate / max(r.oracle_hit_rate, 1e-9)
        for name, r in results.items()
        if name.endswith("/kv") and name.split("/")[0] in ("system_prompts", "multi_turn")
    ]
    return {
        "kv_vs_rr_ttft_p50": ratio("system_prompts"),
        "multi_turn_ratio": ratio("multi_turn"),
        "small_cache_ratio": ratio("small_cache"),
        "hit_rate_vs_oracle": min(vs_oracle, default=float("nan")),
        "no_prefix_ratio": ratio("no_prefix"),
        "no_prefix_lockstep_mean_ratio": ratio("no_prefix_lockstep", mean=True),
    }


async def inproc_main(args: argparse.Namespace) -> None:
    conversations = make_workload(args)
    results: dict[str, Result] = {}
    for name in ("round_robin", "least_loaded", "kv", "oracle"):
        t0 = time.perf_counter()
        results[name] = await run_policy(name, conversations, args)
        logger.info("%s done in %.1f s wall", name, time.perf_counter() - t0)
    logger.info(
        "in-process workload: %d workers, %d conversations x %d turns over %d system prompts "
        "of %d tokens; prefix-sharing ratio %.3f; kv router at the config defaults",
        args.workers, args.conversations, args.turns, args.systems, args.system_tokens,
        results["round_robin"].sharing,
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
    rr, kv, oracle = results["round_robin"], results["kv"], results["oracle"]
    logger.info(
        "in-process results (simulated time)\n%s\nkv/round_robin: ttft p50 x%.2f, hit rate "
        "vs oracle %.3f",
        "\n".join(lines), rr.p(0.5) / kv.p(0.5), kv.hit_rate / max(oracle.hit_rate, 1e-9),
    )  # fmt: skip


async def main_async(args: argparse.Namespace) -> None:
    if args.inproc:
        await inproc_main(args)
    if args.http:
        summary = await http_main(args)
        sys.stdout.write(
            "router " + " ".join(f"{key}={value:.3f}" for key, value in summary.items()) + "\n"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("frontend").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    main()

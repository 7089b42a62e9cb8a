"""bench_router's no_prefix_lockstep replayed in one process in simulated time: where do the
KV router's placements differ from round robin's, and does that cost?

Eight `MockerEngine`s with the HTTP run's timing (configs/local-mocker-kv.yaml, prefill
0.5 ms/token, 1,400 blocks), the real `KvRouter` (config defaults) fed by their KV events (a
4 ms hop) and load reports (every 100 ms), `--lanes` clients each sending its next unique
~3,400-token prompt the moment the last one's stream ends (16 output tokens). The event loop's
clock jumps to the next timer instead of sleeping (`VirtualClockLoop`), so a run takes
seconds, has no HTTP or CPU noise, and gives the same figures every time (checked: each
policy runs twice). Times are model time (through HTTP at `--http-speedup 2` they are halved).

Per policy: TTFT p50 / mean / p90, the share of requests at the prefill floor (TTFT within
1.25x of the 5th percentile over all policies: nothing, or little, ahead of them), throughput,
and per routing decision whether the chosen worker was already running one of our requests
while another ran none ("stacked"), and how many prefills (ours, not yet first-output) it had
ahead. `--hop-ms` adds the HTTP path's latency outside the engine (each message between the
client, the frontend and a worker), `--lanes` the clients: the outcome depends on both (issue
14, fourth round, in benchmarks/README.md).

    python benchmarks/replay_lockstep.py [--requests 160] [--lanes 16] [--policies 'round_robin;kv']

Last line: `replay_lockstep kv_vs_rr_ttft_p50=<x> kv_vs_rr_ttft_mean=<y> kv_stacked=<n>
rr_stacked=<m>` (round robin's / kv's: > 1 kv faster).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import selectors
import statistics
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_router import VOCAB, card_of, mocker_engines, start_routing
from contract.config import MockerConfig
from contract.messages import GenerateRequest, SamplingParams
from mpi_workers.engine import mocker as mocker_module


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Never waits: a wait for the next timer moves the loop's clock there instead."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("simulated time: every task waits and no timer is set")
        self._loop.now += max(timeout, 0.0)
        return super().select(0)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop in simulated time, for in-process replays that do no I/O."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now


@dataclass
class Run:
    policy: str
    ttft_ms: list[float] = field(default_factory=list)
    stacked: int = 0  # routed onto a worker running our request while another ran none
    ahead: list[int] = field(default_factory=list)  # our prefills ahead on the chosen worker
    workers: list[str] = field(default_factory=list)
    # per request: (worker, routed at s, first output at the frontend s, finished s)
    timeline: list[tuple[str, float, float, float]] = field(default_factory=list)
    duration_s: float = 0.0

    def p(self, q: float) -> float:
        data = sorted(self.ttft_ms)
        return data[min(len(data) - 1, int(q * len(data)))]

    def floor_share(self, floor_ms: float) -> float:
        """As bench_router's `at_floor`: within 1.25x of the prefill floor."""
        return sum(t <= 1.25 * floor_ms for t in self.ttft_ms) / len(self.ttft_ms)


async def replay(policy: str, prompts: list[list[int]], args: argparse.Namespace) -> Run:
    loop = asyncio.get_running_loop()
    timing = MockerConfig(prefill_ms_per_token=args.prefill_ms_per_token)  # the rest: yaml's
    ids = [f"w{i}" for i in range(args.workers)]
    engines = mocker_engines(timing, ids, args.num_blocks, max_num_batched_tokens=2048)
    cards = [card_of(worker_id) for worker_id in engines]
    router_name, _, settings = policy.partition(":")  # kv:key=value,key=value
    kv_settings = dict(item.split("=", 1) for item in settings.split(",") if item)
    routing = await start_routing(
        router_name, engines, kv_settings, args.event_delay_ms, args.metrics_ms, loop.time
    )
    router, tracker = routing.router, routing.tracker
    run = Run(policy)
    queue = iter(enumerate(prompts))
    prefilling: set[str] = set()  # our requests without a first output yet

    jitter = random.Random(args.seed + 1)

    def hop() -> float:
        """One message's way between the frontend and a worker or the client (seconds)."""
        return args.hop_ms / 1000.0 * (0.5 + jitter.random())

    async def one(k: int, prompt: list[int]) -> None:
        request = GenerateRequest(
            request_id=f"r{k}", token_ids=prompt,
            sampling=SamplingParams(max_tokens=args.max_tokens, ignore_eos=True),
        )  # fmt: skip
        t0 = loop.time()
        worker_id = router.choose(cards, request).worker_id
        busy = tracker.in_flight
        if busy.get(worker_id, 0) and any(not busy.get(card.worker_id) for card in cards):
            run.stacked += 1
        run.ahead.append(sum(1 for r in prefilling if r.startswith(worker_id + "/")))
        run.workers.append(worker_id)
        tracker.started(worker_id)
        key = f"{worker_id}/{request.request_id}"
        prefilling.add(key)
        first = None
        if args.hop_ms:
            await asyncio.sleep(hop())  # to the worker
        async for out in engines[worker_id].generate(request):
            if out.token_ids and first is None:
                first = loop.time() + hop()  # back at the frontend
                loop.call_at(first, prefilling.discard, key)
                loop.call_at(first, tracker.prefilled, request.request_id)
        await asyncio.sleep(hop())  # the last output's way back
        prefilling.discard(key)
        tracker.finished(worker_id, request.request_id)
        assert first is not None
        run.ttft_ms.append((first - t0) * 1000.0)
        run.timeline.append((worker_id, t0, first, loop.time()))
        await asyncio.sleep(hop())  # to the client, whose next request comes back as fast

    async def lane() -> None:
        for k, prompt in queue:
            await one(k, prompt)

    t0 = loop.time()
    await asyncio.gather(*(lane() for _ in range(args.lanes)))
    run.duration_s = loop.time() - t0
    await routing.stop()
    for engine in engines.values():
        await engine.shutdown()
    return run


def run_in_simulated_time(policy: str, prompts: list[list[int]], args: argparse.Namespace) -> Run:
    loop = VirtualClockLoop()
    saved = mocker_module.time
    # the mocker yields to the loop by wall time between short steps: simulated time instead
    mocker_module.time = types.SimpleNamespace(perf_counter=loop.time)  # type: ignore[assignment]
    try:
        return loop.run_until_complete(replay(policy, prompts, args))
    finally:
        mocker_module.time = saved
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--workers", type=int, default=8)
    add("--lanes", type=int, default=16)
    add("--requests", type=int, default=160)
    add("--prompt-tokens", type=int, default=3400)
    add("--max-tokens", type=int, default=16)
    add("--prefill-ms-per-token", type=float, default=0.5)
    add("--num-blocks", type=int, default=1400)
    add("--event-delay-ms", type=float, default=4.0)
    add("--metrics-ms", type=float, default=100.0)
    add("--policies", default="round_robin;kv", help="';'-separated: round_robin, kv, kv:k=v,...")
    add(
        "--hop-ms",
        type=float,
        default=0.0,
        help="model ms (x0.5-1.5, seeded) each message takes between the frontend and a "
        "worker or the client: the HTTP path's latency outside the engine",
    )
    add("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(3, VOCAB) for _ in range(args.prompt_tokens + rng.randrange(40))]
        for _ in range(args.requests)
    ]
    runs = {}
    for policy in args.policies.split(";"):
        first, again = (run_in_simulated_time(policy, prompts, args) for _ in range(2))
        if first.ttft_ms != again.ttft_ms or first.workers != again.workers:
            sys.exit(f"{policy}: two runs differ: the replay is not deterministic")
        runs[policy] = first
    pooled = sorted(t for run in runs.values() for t in run.ttft_ms)
    floor = pooled[int(0.05 * len(pooled))]  # as bench_router's: the 5th percentile
    sys.stdout.write(
        f"prefill floor (5th percentile TTFT) {floor:.0f} ms; model time; each policy run "
        "twice, identical\n"
        f"{'policy':<16} {'p50_ms':>7} {'mean_ms':>7} {'p90_ms':>7} {'at_floor':>8} "
        f"{'req/s':>6} {'stacked':>7} {'ahead 0/1/2+':>13}\n"
    )
    for policy, run in runs.items():
        ahead = [sum(a == n for a in run.ahead) for n in (0, 1)]
        ahead.append(len(run.ahead) - sum(ahead))
        sys.stdout.write(
            f"{policy:<16} {run.p(0.5):>7.0f} {statistics.fmean(run.ttft_ms):>7.0f} "
            f"{run.p(0.9):>7.0f} {run.floor_share(floor):>8.2f} "
            f"{len(run.ttft_ms) / run.duration_s:>6.2f} {run.stacked:>7d} "
            f"{'/'.join(map(str, ahead)):>13}\n"
        )
    rr, kv = runs.get("round_robin"), runs.get("kv")
    if rr is not None and kv is not None:
        sys.stdout.write(
            f"replay_lockstep kv_vs_rr_ttft_p50={rr.p(0.5) / kv.p(0.5):.3f} "
            f"kv_vs_rr_ttft_mean={statistics.fmean(rr.ttft_ms) / statistics.fmean(kv.ttft_ms):.3f} "
            f"kv_stacked={kv.stacked} rr_stacked={rr.stacked}\n"
        )


if __name__ == "__main__":
    main()

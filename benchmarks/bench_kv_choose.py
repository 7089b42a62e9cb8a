"""The KV router's request-path cost: `KvRouter.choose` plus the finish, µs per request.

No I/O: a `KvIndex` filled by hand, a `LoadTracker`, the router. Three scenarios:

- c1: what a frontend at concurrency 1 does (issue 14's in-situ profile): 8 workers, a short
  chat prompt (40 tokens) cached on one worker, every other worker caching other prompts;
  each request is chosen, started and finished before the next;
- hot: concurrency 1 again, one prompt of 40 blocks cached on every worker (the scale-out
  sweep's repeated question);
- loaded: 16 requests in flight over 8 workers that publish `LoadMetrics`, each prompt one
  of 4 system prompts (~600 tokens) plus a unique question; each request prefills (first
  output) and finishes 16 requests after it was routed.

`--grid` adds the index walk's cases (`KvIndex.prefix_depths` is most of what the index
costs a choice): 8 and 64 workers, each holding `--background` blocks of other prompts, a short
(3 blocks) and a long (220 blocks) prompt, cached nowhere, whole on one worker, or on half the
workers: its first three quarters (a shared system prompt, a new question) or whole.
Each is timed at concurrency 1 as `c1` (choose, start, finish) and, apart, the walk alone.

`--processes N` (N > 1) routes as one of N frontend processes of a deployment does: the
router and tracker attached to a shared load table of N rows in /dev/shm (this process's
row; the others empty), so every choice also reads the other rows and writes its own
(`frontend.load_table`: counts, turns, pending prefill, routed prefixes).

`--baseline DIR` times another tree's `frontend/kv_router.py` too (with its `kv_index.py` and
`contract/block_hash.py`), e.g. main's checkout, alternating the two in rounds so that machine
load falls on both alike, and counts the requests the two routed differently. Requests are built
before the timing (their pydantic validation is not the router's).

    python benchmarks/bench_kv_choose.py [--baseline /work/main] [--rounds 5] [--processes 2]

Last line: `kv_choose c1_us=<x> loaded_us=<y>` (the best rounds' µs per request) and with a
baseline `c1_vs_baseline=<r> loaded_vs_baseline=<r>`: each tree's best round over the other's
(< 1: faster; on a shared machine the best round is the least disturbed one, as in `timeit`;
every round's ratio is printed too). Times are this process's CPU time (`process_time`): on a
busy machine the time it spent descheduled is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.block_hash import block_hashes
from contract.config import KvRouterConfig
from contract.discovery import WorkerCard
from contract.messages import GenerateRequest, LoadMetrics
from frontend import kv_router, load_table
from frontend.router import LoadTracker

WORKERS = 8
BLOCK = 16


def card(worker_id: str) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id, role="agg", model="m", block_size=BLOCK, subject="s",
        abort_subject="a", capacity=8, max_model_len=4096,
    )  # fmt: skip


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


Scenario = Callable[[ModuleType, int], tuple[float, list[str]]]
SHARED: list[tuple[Path, int]] = []  # --processes: [(a folder for the tables, their rows)]


@contextlib.contextmanager
def routing(
    module: ModuleType,
    index: object,
    clock: Callable[[], float] | None = None,
    in_flight: list[list[int]] = (),  # type: ignore[assignment]
):
    """(router, tracker) of `module`, attached to the shared table with `--processes`,
    where each other process has `in_flight`'s prompts in flight on every worker (what the
    sweep's repeated prompt looks like from one process: all of them route it)."""
    tracker = LoadTracker()
    extra = {} if clock is None else {"clock": clock}
    router = module.KvRouter(KvRouterConfig(), index, tracker, seed=7, **extra)
    if not SHARED:
        yield router, tracker
        return
    folder, rows = SHARED[0]
    path = folder / f"load-{next(_TABLES)}"  # a fresh table: no turns or starts left over
    tables = module.load_table  # the tree's own shared table
    share = tables.TableLoadShare(tables.LoadTable(str(path), 0, rows), tracker, router.own_blocks)
    share.attach()
    peers = [tables.LoadTable(str(path), row, rows) for row in range(1, rows)]
    for peer in peers:
        peer.claim()
        for prompt in in_flight:
            for i in range(WORKERS):
                peer.add_prefix(f"w{i}", block_hashes(prompt, BLOCK))
    router.share_turns(tables.SharedTurns(share.table), tables.SharedTurns.stamp)
    router.share_routing(tables.SharedRouting(share.table))
    try:
        yield router, tracker
    finally:
        for table in (share.table, *peers):
            table.release()
            table.close()
        path.unlink()


_TABLES = itertools.count()


def c1(module: ModuleType, n: int) -> tuple[float, list[str]]:
    """Seconds for `n` requests at concurrency 1, and the workers chosen."""
    index = module.KvIndex()
    cards = [card(f"w{i}") for i in range(WORKERS)]
    prompt = list(range(100, 140))
    for i in range(WORKERS):
        index.store(f"w{i}", block_hashes(list(range(1000 * i, 1000 * i + 160)), BLOCK))
    index.store("w3", block_hashes(prompt, BLOCK))
    with routing(module, index, in_flight=[prompt]) as (router, tracker):
        return choose_one_at_a_time(router, tracker, cards, prompt, n)


def hot(module: ModuleType, n: int) -> tuple[float, list[str]]:
    """Seconds for `n` requests at concurrency 1 of one hot prompt (40 blocks) cached on
    every worker, as the scale-out sweep's repeated question is (with `--processes`, every
    other process has it in flight on every worker too)."""
    index = module.KvIndex()
    cards = [card(f"w{i}") for i in range(WORKERS)]
    prompt = list(range(100, 100 + 40 * BLOCK))
    for i in range(WORKERS):
        index.store(f"w{i}", block_hashes(prompt, BLOCK))
    with routing(module, index, in_flight=[prompt]) as (router, tracker):
        return choose_one_at_a_time(router, tracker, cards, prompt, n)


def choose_one_at_a_time(
    router: object, tracker: LoadTracker, cards: list[WorkerCard], prompt: list[int], n: int
) -> tuple[float, list[str]]:
    """CPU seconds for `n` choices of `prompt`, each request finished before the next, and
    the workers chosen."""
    requests = [GenerateRequest(request_id=f"r{k}", token_ids=prompt) for k in range(n)]
    chosen = []
    t0 = time.process_time()
    for request in requests:
        worker_id = router.choose(cards, request).worker_id  # type: ignore[attr-defined]
        tracker.started(worker_id)
        tracker.finished(worker_id, request.request_id)
        chosen.append(worker_id)
    return time.process_time() - t0, chosen


def grid_case(
    workers: int, blocks: int, cached: str, background: int
) -> tuple[Scenario, Scenario]:
    """(choose, walk) scenarios of one `--grid` case: `cached` is none, one, half-prefix or
    half-whole."""

    def build(module: ModuleType) -> tuple[object, list[int], list[WorkerCard]]:
        rng = random.Random(workers * 1000 + blocks)
        index = module.KvIndex()
        for i in range(workers):
            index.store(f"w{i}", [rng.getrandbits(64) for _ in range(background)])
        prompt = [rng.randrange(3, 32000) for _ in range(blocks * BLOCK)]
        hashes = block_hashes(prompt, BLOCK)
        holders = {"none": 0, "one": 1}.get(cached, workers // 2)
        held = hashes[: len(hashes) * 3 // 4] if cached == "half-prefix" else hashes
        for i in range(holders):
            index.store(f"w{(i * 3) % workers}", held)
        return index, prompt, [card(f"w{i}") for i in range(workers)]

    def choose(module: ModuleType, n: int) -> tuple[float, list[str]]:
        index, prompt, cards = build(module)
        with routing(module, index) as (router, tracker):
            return choose_one_at_a_time(router, tracker, cards, prompt, n)

    def walk(module: ModuleType, n: int) -> tuple[float, list[str]]:
        index, prompt, _ = build(module)
        hashes = block_hashes(prompt, BLOCK)
        depths = index.prefix_depths  # type: ignore[attr-defined]
        t0 = time.process_time()
        for _ in range(n):
            found = depths(hashes)
        seconds = time.process_time() - t0
        return seconds, [str(sorted(found.items()))]  # the same depths in both trees

    return choose, walk


def loaded(module: ModuleType, n: int) -> tuple[float, list[str]]:
    """Seconds for `n` requests with 16 in flight (prefilled and finished 16 later)."""
    index = module.KvIndex()
    clock = iter(range(10**9)).__next__  # 1 s a request: deterministic prefill rates
    systems = system_prompts()
    with routing(module, index, clock, in_flight=systems) as (router, tracker):
        return _loaded(router, tracker, index, n)


def system_prompts() -> list[list[int]]:
    """The loaded scenario's 4 system prompts (~600 tokens each; its rng's first draws)."""
    rng = random.Random(1)
    return [[rng.randrange(3, 32000) for _ in range(600)] for _ in range(4)]


def _loaded(router: object, tracker: LoadTracker, index: object, n: int) -> tuple[float, list[str]]:
    cards = [card(f"w{i}") for i in range(WORKERS)]
    rng = random.Random(1)
    systems = [[rng.randrange(3, 32000) for _ in range(600)] for _ in range(4)]
    requests = [
        GenerateRequest(
            request_id=f"r{k}",
            token_ids=rng.choice(systems) + [rng.randrange(3, 32000) for _ in range(30)],
        )
        for k in range(n)
    ]
    for i in range(WORKERS):
        tracker.update(LoadMetrics(worker_id=f"w{i}", active_blocks=40 * i))
    chosen: list[str] = []
    t0 = time.process_time()
    for k, request in enumerate(requests):
        worker_id = router.choose(cards, request).worker_id  # type: ignore[attr-defined]
        tracker.started(worker_id)
        chosen.append(worker_id)
        if k % 64 == 0:  # the engine's KV events: the prompt is cached there now
            index.store(worker_id, block_hashes(request.token_ids, BLOCK))  # type: ignore[attr-defined]
        if k >= 16:
            done = requests[k - 16]
            tracker.prefilled(done.request_id)
            tracker.finished(chosen[k - 16], done.request_id)
    return time.process_time() - t0, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline",
        help="another tree (its frontend/kv_router.py and contract/block_hash.py) to time "
        "against this one",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--grid", action="store_true", help="also the index walk's cases")
    parser.add_argument("--background", type=int, default=2000, help="--grid: a worker's blocks")
    parser.add_argument(
        "--processes", type=int, default=1,
        help="route as one of this many frontend processes (a shared load table; > 1)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.processes > 1:
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="bench-kv-choose-") as folder:
            SHARED.append((Path(folder), args.processes))
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    kv_router.load_table = load_table  # type: ignore[attr-defined]  # `routing` reads it
    modules = {"this": kv_router}
    if args.baseline:
        tree = Path(args.baseline)
        baseline = load_module(tree / "frontend/kv_router.py", "kv_router_baseline")
        # and its block hashing, which prompt_hashes looks up in its module
        hashing = load_module(tree / "contract/block_hash.py", "block_hash_baseline")
        baseline.block_hashes = hashing.block_hashes
        baseline.media_block_extras = hashing.media_block_extras
        # and its KV index (the scenarios build `module.KvIndex`)
        baseline.KvIndex = load_module(tree / "frontend/kv_index.py", "kv_index_baseline").KvIndex
        # and its shared table (--processes)
        baseline.load_table = load_module(tree / "frontend/load_table.py", "load_table_baseline")
        modules["baseline"] = baseline
    scenarios: dict[str, Scenario] = {"c1": c1, "loaded": loaded, "hot": hot}
    if args.grid:
        for workers in (8, 64):
            for blocks in (3, 220):
                for cached in ("none", "one", "half-prefix", "half-whole"):
                    name = f"w{workers}-b{blocks}-{cached}"
                    choose, walk = grid_case(workers, blocks, cached, args.background)
                    scenarios[name], scenarios[f"{name}-walk"] = choose, walk
    per_request: dict[tuple[str, str], list[float]] = {}
    differ: dict[str, int] = {}  # scenario -> requests the two trees routed differently
    for _ in range(args.rounds):
        for scenario_name, scenario in scenarios.items():
            chosen = {}
            for name, module in modules.items():
                scenario(module, 200)  # warm-up
                seconds, chosen[name] = scenario(module, args.requests)
                per_request.setdefault((scenario_name, name), []).append(
                    seconds / args.requests * 1e6
                )
            if len(chosen) == 2:  # the same decisions unless a rule changed between trees
                differ[scenario_name] = sum(a != b for a, b in zip(*chosen.values(), strict=True))
    summary = {}
    for (scenario_name, name), values in per_request.items():
        median = statistics.median(values)
        sys.stdout.write(
            f"{scenario_name:<7} {name:<9} µs/request median {median:6.1f} best {min(values):6.1f} "
            f"(rounds: {' '.join(f'{v:.1f}' for v in values)})\n"
        )
        if name == "this":
            summary[f"{scenario_name}_us"] = min(values)  # the best round, as the ratios
    if args.baseline:
        for scenario_name in scenarios:
            pairs = zip(
                per_request[(scenario_name, "this")],
                per_request[(scenario_name, "baseline")],
                strict=True,
            )
            ratios = [this / base for this, base in pairs]
            best = min(per_request[(scenario_name, "this")]) / min(
                per_request[(scenario_name, "baseline")]
            )
            sys.stdout.write(
                f"{scenario_name:<7} this / baseline per round: "
                f"{' '.join(f'{r:.2f}' for r in ratios)}; best round / best round {best:.2f}\n"
            )
            summary[f"{scenario_name}_vs_baseline"] = best
        sys.stdout.write(
            "requests routed differently by the two trees (last round): "
            + ", ".join(f"{name} {count} of {args.requests}" for name, count in differ.items())
            + "\n"
        )
    sys.stdout.write(
        "kv_choose " + " ".join(f"{key}={value:.3f}" for key, value in summary.items()) + "\n"
    )


if __name__ == "__main__":
    main()

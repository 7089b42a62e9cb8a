"""What a frontend process pays to keep its KV index current: µs per worker event batch, parsed
(`contract.messages.parse_kv_event_batch`) and applied (`KvIndexFeed.handle_batch`).

Every frontend process of a deployment applies every worker's batches (each keeps the whole
index), so at N processes each pays for the deployment's N× its own rate: per request it
routes, N times the cost of one request's batches. The scale-out sweep's prompt is one
repeated question, cached after the first request, so there that cost is nil
(benchmarks/README.md, branch scale2); with new prompts it is not. Here: `--workers` workers,
each request a new prompt of `--blocks` full blocks stored in one batch, and once a worker holds
`--resident` prompts each batch also removes its oldest prompt's blocks (the mocker's eviction),
so a batch carries `--blocks` stored and as many removed hashes. Every worker also holds a
system prompt of `--system-blocks` blocks, queried once before the timing (an index that keeps
entries for blocks several workers hold pays to keep them true on every event).

`--baseline DIR` times another tree's `frontend/kv_index.py` and `parse_kv_event_batch` (its
`contract/messages.py`) too, e.g. main's checkout, the two alternated in rounds so that the
machine's load falls on both alike, and checks both end with the same index. Each side gets
the batches as its own `kv_batch_json` writes them (protocol 1 wrote a dict per stored
block, 2 a flat list of hashes).

    python benchmarks/bench_kv_intake.py [--baseline /work/main] [--rounds 6]

Each side's CPU time (not wall time: a busy machine's descheduling is not counted) over the same
chunks of batches, the sides alternated chunk by chunk. Last line: `kv_intake
us_per_batch=<mean> [baseline_us=<mean> vs_baseline=<median of the chunks' ratios>]`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_kv_choose import load_module  # a baseline tree's module by path
from contract import messages
from frontend import kv_index

Batch = tuple[str, int, list[tuple[bool, list[int]]]]  # worker, seq, (stored?, hashes)


def worker_batches(workers: int, count: int, blocks: int, resident: int) -> list[Batch]:
    """`count` batches, the workers' in turn, each with its next `seq`."""
    rng = random.Random(1)
    seqs = [0] * workers
    held: list[list[list[int]]] = [[] for _ in range(workers)]
    out = []
    for k in range(count):
        w = k % workers
        hashes = [rng.getrandbits(63) for _ in range(blocks)]
        events = [(True, hashes)]
        held[w].append(hashes)
        if len(held[w]) > resident:
            events.append((False, held[w].pop(0)))
        seqs[w] += 1
        out.append((f"w{w}", seqs[w], events))
    return out


def on_wire(module: ModuleType, batches: list[Batch], block_size: int = 16) -> list[bytes]:
    """`batches` as `module`'s (a `contract/messages.py`) worker writes them."""
    def stored(hashes: list[int]):  # type: ignore[no-untyped-def]
        if hasattr(module, "StoredBlock"):  # protocol 1: a dict per block
            blocks = [module.StoredBlock(block_hash=h, num_tokens=block_size) for h in hashes]
            return module.KvStored(parent_hash=None, blocks=blocks)
        return module.KvStored(parent_hash=None, block_hashes=hashes)

    return [
        module.kv_batch_json(worker, seq, [
            stored(hashes) if is_stored else module.KvRemoved(block_hashes=hashes)
            for is_stored, hashes in events
        ])
        for worker, seq, events in batches
    ]  # fmt: skip


def warmed_feed(index_module: ModuleType, parse, batches: list[bytes], workers: int,  # type: ignore[no-untyped-def]
                system: list[int] = ()):  # fmt: skip
    """A feed of `index_module` that has applied `batches` (the index at its working size),
    every worker holding `system` (a shared system prompt's hashes, looked up once)."""
    feed = index_module.KvIndexFeed(index_module.KvIndex())
    if system:
        for w in range(workers):
            feed.index.store(f"w{w}", system)
        feed.index.prefix_depths(system)
    # no event loop here: the workers are known and synced by hand, not by the directory
    feed._workers = {f"w{w}" for w in range(workers)}
    for w in range(workers):
        feed._sync[f"w{w}"] = index_module._WorkerSync(last_seq=0)
    for data in batches:
        feed.handle_batch(parse(data))
    return feed


def timed_intake(feed, parse, batches: list[bytes]) -> float:  # type: ignore[no-untyped-def]
    """CPU seconds (this process's: time it was descheduled by a busy machine not counted)
    to parse and apply `batches`."""
    t0 = time.process_time()
    for data in batches:
        feed.handle_batch(parse(data))
    return time.process_time() - t0


def _publish(url: str, subject: str, batches: list[bytes]) -> None:
    """A child process: publish `batches` on `subject`, then wait for NATS to have them."""
    import asyncio

    from contract.bus import connect

    async def run() -> None:
        publisher = await connect(url, "bench-kv-intake-publisher")
        for data in batches:
            await publisher.publish(subject, data)
        await publisher.flush()
        await publisher.close()

    asyncio.run(run())


async def over_nats(
    sides: dict[str, ModuleType], batches: list[bytes], warm: int, workers: int, rounds: int
) -> None:
    """Each side's feed (a `frontend/kv_index.py`) subscribed to a real nats-server, the timed
    batches published by a child process: this process's CPU per batch received (nats-py's
    read, its hand-over to the feed, then the parse and apply), less the direct parse and
    apply of the same batches by an equal feed: NATS's delivery per message. The sides in
    turn, `rounds` times; both parse with this tree's `parse_kv_event_batch`."""
    import asyncio
    import multiprocessing
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from real_services import start_nats

    from contract.bus import kv_events_subject

    parse = messages.parse_kv_event_batch
    timed = batches[warm:]
    n = len(timed)
    final = {f"w{w}": sum(1 for k in range(len(batches)) if k % workers == w)
             for w in range(workers)}  # fmt: skip
    delivery: dict[str, list[float]] = {name: [] for name in sides}
    received: dict[str, list[float]] = {name: [] for name in sides}  # CPU a batch, all of it
    with tempfile.TemporaryDirectory(prefix="bench-kv-intake-") as tmp:
        nats_server, url = start_nats(Path(tmp))
        try:
            for r in range(rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in order:
                    module = sides[name]
                    direct = timed_intake(warmed_feed(module, parse, batches[:warm], workers),
                                          parse, timed)  # fmt: skip
                    feed = warmed_feed(module, parse, batches[:warm], workers)
                    feed._nats_url, feed._deployment = url, f"bench{r}{name}"
                    await feed.start()
                    subject = kv_events_subject(feed._deployment)
                    child = multiprocessing.Process(target=_publish, args=(url, subject, timed))
                    cpu0 = time.process_time()
                    child.start()
                    deadline = time.monotonic() + 120
                    while any(feed._sync[w].last_seq != seq for w, seq in final.items()):
                        if time.monotonic() > deadline:
                            raise RuntimeError("over NATS: not every batch arrived in 120 s")
                        await asyncio.sleep(0.002)
                    cpu = time.process_time() - cpu0
                    child.join()
                    await feed.stop()
                    delivery[name].append((cpu - direct) / n * 1e6)
                    received[name].append(cpu / n * 1e6)
                    print(f"over NATS round {r} {name}: {cpu / n * 1e6:.1f} µs of the "
                          f"subscriber's CPU a batch, direct parse + apply {direct / n * 1e6:.1f}"
                          f" µs: NATS's delivery {delivery[name][-1]:.1f} µs a message "
                          f"(gaps {feed.num_gaps}), load {os.getloadavg()[0]:.2f}")  # fmt: skip
        finally:
            nats_server.stop()
    line = "over NATS, delivery µs a message (median of rounds): " + ", ".join(
        f"{name} {statistics.median(values):.1f}" for name, values in delivery.items()
    )
    print(line)
    if "baseline" in received:
        for what, values in (("delivery", delivery), ("all of a batch received", received)):
            ratios = [a / b for a, b in zip(values["this"], values["baseline"], strict=True)]
            per_round = " ".join(f"x{x:.2f}" for x in ratios)
            median = statistics.median(ratios)
            print(f"over NATS, {what}: this/baseline per round {per_round} (median x{median:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="another tree to time alternately (e.g. /work/main)")
    parser.add_argument("--rounds", type=int, default=20, help="chunks, sides alternated")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--blocks", type=int, default=37, help="full blocks a prompt stores")
    parser.add_argument("--resident", type=int, default=200, help="prompts a worker keeps")
    parser.add_argument("--batches", type=int, default=6000, help="timed, after the warm-up")
    parser.add_argument("--system-blocks", type=int, default=40, help="every worker holds")
    parser.add_argument(
        "--over-nats", action="store_true",
        help="instead: the feeds fed through a real nats-server (NATS's share per batch)",
    )  # fmt: skip
    parser.add_argument("--nats-rounds", type=int, default=4, help="--over-nats: rounds")
    args = parser.parse_args()
    warm = args.workers * args.resident  # every worker evicting from the first timed batch
    batches = worker_batches(args.workers, warm + args.batches, args.blocks, args.resident)
    sides = {"this": (kv_index, messages)}
    if args.baseline:
        base = Path(args.baseline)
        base_messages = load_module(base / "contract" / "messages.py", "baseline_messages")
        base_index = load_module(base / "frontend" / "kv_index.py", "baseline_kv_index")
        sides["baseline"] = (base_index, base_messages)
    if args.over_nats:
        import asyncio

        feeds = {name: index_module for name, (index_module, _) in sides.items()}
        wire = on_wire(messages, batches)
        asyncio.run(over_nats(feeds, wire, warm, args.workers, args.nats_rounds))
        return
    wire = {name: on_wire(module, batches) for name, (_, module) in sides.items()}
    parses = {name: module.parse_kv_event_batch for name, (_, module) in sides.items()}
    system = [random.Random(2).getrandbits(64) for _ in range(args.system_blocks)]
    feeds = {name: warmed_feed(index_module, parses[name], wire[name][:warm], args.workers, system)
             for name, (index_module, _) in sides.items()}  # fmt: skip
    size = max(1, args.batches // args.rounds)
    spent = dict.fromkeys(sides, 0.0)
    ratios = []
    for r in range(args.rounds):
        lo, hi = warm + r * size, warm + (r + 1) * size
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        took = {name: timed_intake(feeds[name], parses[name], wire[name][lo:hi])
                for name in order}  # fmt: skip
        for name in sides:
            spent[name] += took[name]
        line = f"round {r}: " + ", ".join(
            f"{n} {took[n] / size * 1e6:.1f} µs a batch" for n in sides
        )
        if "baseline" in took:
            ratios.append(took["this"] / took["baseline"])
            line += f", this/baseline x{ratios[-1]:.3f}"
        print(f"{line}, load {os.getloadavg()[0]:.2f}")
    if "baseline" in feeds:  # both applied the same batches: the same index
        this, base = feeds["this"].index, feeds["baseline"].index
        assert all(this.blocks_of(w) == base.blocks_of(w) for w in base.workers)
    mean = {name: cpu / (size * args.rounds) for name, cpu in spent.items()}
    us = mean["this"] * 1e6
    print(f"per request routed at N frontend processes (a batch per request): N x {us:.1f} µs "
          f"({args.blocks} stored + {args.blocks} removed hashes a batch)")  # fmt: skip
    last = f"kv_intake us_per_batch={us:.1f}"
    if ratios:
        last += (f" baseline_us={mean['baseline'] * 1e6:.1f} "
                 f"vs_baseline={statistics.median(ratios):.3f}")  # fmt: skip
    print(last)


if __name__ == "__main__":
    main()

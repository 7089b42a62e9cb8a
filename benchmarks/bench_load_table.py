"""What the shared load table (`frontend.load_table`) costs a frontend process per request,
against the peers' counts kept in dicts (what the NATS load share's sums are).

One process, no I/O: a `LoadTracker` whose peer counts are either dicts (`nats`: filled once,
as `frontend.load_share.PeerLoads` keeps them; its `on_change` only marks a flush due, as
`LoadShare.changed` does between two publishes, so the publishing, and the peers' parsing
of each message, are not counted) or read from a table in /dev/shm (`table`) where six other
rows hold counts; the router chooses among 8 workers with 16 requests in flight, each request
chosen, started, (kv: prefilled) and finished 16 requests later, so each request writes our
row twice. Rounds alternate the two; each round's ratio is printed with the load average.
kv also runs `routing`: the table with the KV router's routing shared too
(`SharedRouting`: pending prefill, prefill starts, in-flight prompts' sampled hashes; the six
other rows hold 16 in-flight prompts each), its ratio against `table`. `--system-tokens N`
prefixes each prompt with one of 8 system prompts of N tokens (what the prefix table is for).

    python benchmarks/bench_load_table.py [--rounds 5] [--requests 20000] [--system-tokens 0]

Last line: `load_table <router>_us=<table µs> <router>_vs_nats=<median ratio> ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.config import KvRouterConfig
from contract.discovery import WorkerCard
from contract.messages import GenerateRequest
from frontend.kv_index import KvIndex
from frontend.kv_router import KvRouter, prompt_hashes
from frontend.load_table import LoadTable, SharedRouting, TableLoadShare
from frontend.router import LeastLoadedRouter, LoadTracker, Router

WORKERS = 8
PROCESSES = 7
IN_FLIGHT = 16


def card(worker_id: str) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id, role="agg", model="m", block_size=16, subject="s",
        abort_subject="a", capacity=8, max_model_len=4096,
    )  # fmt: skip


def peer_counts(worker: int, process: int) -> tuple[int, int]:
    """What peer `process` has in flight on worker `worker` (requests, blocks)."""
    requests = (worker + process) % 3
    return requests, 5 * requests


def prompt(k: int, system_tokens: int) -> list[int]:
    system = [5000 + 8 * t + k % 8 for t in range(system_tokens)]  # one of 8 system prompts
    return system + [3 + k % 997, 7, 11] * 20


def run(router_name: str, sharing: str, path: str, n: int, system_tokens: int = 0) -> float:
    """Seconds for `n` requests."""
    tracker = LoadTracker()
    router: Router
    blocks_of = None
    if router_name == "kv":
        kv = KvRouter(KvRouterConfig(), KvIndex(), tracker, seed=7)
        router, blocks_of = kv, kv.own_blocks
    else:
        router = LeastLoadedRouter(tracker)
    ids = [f"w{i}" for i in range(WORKERS)]
    cards = [card(worker_id) for worker_id in ids]
    peers = range(1, PROCESSES)
    tables = []
    if sharing in ("table", "routing"):
        for process in peers:  # the other processes' rows
            table = LoadTable(path, process, PROCESSES)
            table.claim()
            for worker, worker_id in enumerate(ids):
                table.write(worker_id, *peer_counts(worker, process))
                if sharing == "routing":
                    table.write_pending(worker_id, 10 * peer_counts(worker, process)[0])
            if sharing == "routing":
                for k in range(IN_FLIGHT):
                    hashes = prompt_hashes(prompt(1000 * process + k, system_tokens), 16)
                    table.add_prefix(ids[(k + process) % WORKERS], hashes)
            tables.append(table)
        share = TableLoadShare(LoadTable(path, 0, PROCESSES), tracker, blocks_of)
        share.attach()
        tables.append(share.table)
        if sharing == "routing":
            kv.share_routing(SharedRouting(share.table))
    else:
        requests_sum = {w: sum(peer_counts(i, p)[0] for p in peers) for i, w in enumerate(ids)}
        blocks_sum = {w: sum(peer_counts(i, p)[1] for p in peers) for i, w in enumerate(ids)}
        tracker.peer_requests, tracker.peer_blocks = requests_sum, blocks_sum
        flush = [False]

        def changed(worker_id: str) -> None:
            if not flush[0]:
                flush[0] = True

        tracker.on_change = changed
    requests = [
        GenerateRequest(request_id=f"r{k}", token_ids=prompt(k, system_tokens))
        for k in range(n)
    ]
    chosen: list[str] = []
    t0 = time.perf_counter()
    for k, request in enumerate(requests):
        worker_id = router.choose(cards, request).worker_id
        tracker.started(worker_id)
        chosen.append(worker_id)
        if k >= IN_FLIGHT:
            done = requests[k - IN_FLIGHT]
            tracker.prefilled(done.request_id)
            tracker.finished(chosen[k - IN_FLIGHT], done.request_id)
    seconds = time.perf_counter() - t0
    for table in tables:
        table.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--system-tokens", type=int, default=0)
    args = parser.parse_args()
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    summary = []
    for router_name in ("least_loaded", "kv"):
        modes = ("nats", "table", "routing") if router_name == "kv" else ("nats", "table")
        per_request: dict[str, list[float]] = {mode: [] for mode in modes}
        ratios, routing_ratios = [], []
        for round_ in range(args.rounds):
            order = modes if round_ % 2 == 0 else modes[::-1]
            for sharing in order:
                path = os.path.join(folder, f"bench-load-table-{os.getpid()}")
                try:
                    run(router_name, sharing, path, 500, args.system_tokens)  # warm-up
                    seconds = run(router_name, sharing, path, args.requests, args.system_tokens)
                finally:
                    Path(path).unlink(missing_ok=True)
                per_request[sharing].append(seconds / args.requests * 1e6)
            ratios.append(per_request["table"][-1] / per_request["nats"][-1])
            routing = ""
            if "routing" in per_request:
                routing_ratios.append(per_request["routing"][-1] / per_request["table"][-1])
                routing = (f", routing {per_request['routing'][-1]:.2f} µs "
                           f"(x{routing_ratios[-1]:.3f} of table)")  # fmt: skip
            print(f"{router_name} round {round_}: nats {per_request['nats'][-1]:.2f} µs, "
                  f"table {per_request['table'][-1]:.2f} µs, x{ratios[-1]:.3f}{routing}, "
                  f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
        best = {name: min(values) for name, values in per_request.items()}
        added = best["table"] - best["nats"]
        print(f"{router_name}: best round nats {best['nats']:.2f} µs, table "
              f"{best['table']:.2f} µs a request (+{added:.2f} µs)")  # fmt: skip
        summary.append(f"{router_name}_us={best['table']:.2f} "
                       f"{router_name}_vs_nats={statistics.median(ratios):.3f}")  # fmt: skip
        if routing_ratios:
            summary.append(f"kv_routing_us={best['routing']:.2f} "
                           f"kv_routing_vs_table={statistics.median(routing_ratios):.3f}")
    print("load_table " + " ".join(summary))


if __name__ == "__main__":
    main()

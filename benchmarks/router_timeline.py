"""Per-worker timelines of a bench_router run from its frontend log: where did requests wait?

`bench_router.py --dump DIR --router-log` keeps each run's frontend log with a
`frontend.timeline` line per request sent to a worker, first output and release (monotonic
times), and for the kv policy the router's decisions. For each log this prints the TTFT as the
frontend saw it (sent to first output), split by how many of our prefills were ahead of the
request on its worker when it was sent, and the hindsight regret of each routing decision:
how much longer the prefills ahead on the chosen worker ran than those on the worker whose
prefills ended first (0 for a worker with none), from the logged first outputs. Round robin
makes few such mistakes in lockstep (the worker routed to least recently is the one whose
prefills end first); a router that misjudges the prefill ahead makes more (issue 14, fifth
round, in benchmarks/README.md).

    python benchmarks/router_timeline.py DIR/no_prefix_lockstep-kv-0.frontend.log ... [--workers 12]

`--workers N`: also each worker's first N requests as [sent>first output|released ahead].
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_SENT = re.compile(r"frontend\.timeline: sent (\S+) to (\S+) at ([\d.]+)")
_FIRST = re.compile(r"frontend\.timeline: first output (\S+) at ([\d.]+)")
_RELEASED = re.compile(r"frontend\.timeline: released (\S+) at ([\d.]+)")


@dataclass
class Request:
    request_id: str
    worker: str
    sent: float  # seconds from the run's first request
    first: float
    released: float
    ahead: int = 0  # our requests on the worker still without a first output when sent
    regret: float = 0.0  # seconds its prefills ahead ran past the soonest worker's


def read_log(lines: list[str]) -> list[Request]:
    """The requests with all three timeline lines, in the order they were sent."""
    sent: dict[str, tuple[str, float]] = {}
    first: dict[str, float] = {}
    released: dict[str, float] = {}
    for line in lines:
        if m := _SENT.search(line):
            sent[m[1]] = (m[2], float(m[3]))
        elif m := _FIRST.search(line):
            first[m[1]] = float(m[2])
        elif m := _RELEASED.search(line):
            released[m[1]] = float(m[2])
    done = [rid for rid in sent if rid in first and rid in released]
    if not done:
        return []
    start = min(sent[rid][1] for rid in done)
    requests = [
        Request(rid, sent[rid][0], sent[rid][1] - start, first[rid] - start,
                released[rid] - start)
        for rid in done
    ]  # fmt: skip
    requests.sort(key=lambda r: r.sent)
    _judge(requests)
    return requests


def _judge(requests: list[Request]) -> None:
    """Fill in each request's prefills ahead and its hindsight regret (`requests` in the
    order they were sent)."""
    workers = sorted({r.worker for r in requests})
    for k, r in enumerate(requests):
        clear_at = dict.fromkeys(workers, 0.0)  # when each worker's prefills ahead ended
        for other in requests[:k]:
            if r.sent < other.first:
                clear_at[other.worker] = max(clear_at[other.worker], other.first - r.sent)
                if other.worker == r.worker:
                    r.ahead += 1
        r.regret = clear_at[r.worker] - min(clear_at.values())


def summary(name: str, requests: list[Request]) -> str:
    ttft = [(r.first - r.sent) * 1000 for r in requests]
    regret = [r.regret * 1000 for r in requests]
    lines = [
        f"{name}: {len(requests)} requests, TTFT at the frontend p50 "
        f"{statistics.median(ttft):.0f} ms, mean {statistics.fmean(ttft):.0f} ms; regret mean "
        f"{statistics.fmean(regret):.0f} ms, {sum(x > 100 for x in regret)} decisions > 100 ms, "
        f"{sum(x > 300 for x in regret)} > 300 ms"
    ]
    by_ahead: dict[int, list[float]] = defaultdict(list)
    for r, t in zip(requests, ttft, strict=True):
        by_ahead[min(r.ahead, 2)].append(t)
    for ahead, times in sorted(by_ahead.items()):
        label = f"{ahead}+" if ahead == 2 else str(ahead)
        lines.append(
            f"  {label} prefills ahead: {len(times):4d} requests, TTFT p50 "
            f"{statistics.median(times):.0f} ms, mean {statistics.fmean(times):.0f} ms"
        )
    return "\n".join(lines)


def timelines(requests: list[Request], first_n: int) -> str:
    by_worker: dict[str, list[Request]] = defaultdict(list)
    for r in requests:
        by_worker[r.worker].append(r)
    return "\n".join(
        f"  {worker} " + " ".join(
            f"[{r.sent:.2f}>{r.first:.2f}|{r.released:.2f} a{r.ahead}]" for r in mine[:first_n]
        )
        for worker, mine in sorted(by_worker.items())
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--workers", type=int, default=0, help="print each worker's first N")
    args = parser.parse_args(argv)
    for path in args.logs:
        requests = read_log(path.read_text().splitlines())
        if not requests:
            sys.stdout.write(f"{path.name}: no frontend.timeline lines (--router-log?)\n")
            continue
        sys.stdout.write(summary(path.name, requests) + "\n")
        if args.workers:
            sys.stdout.write(timelines(requests, args.workers) + "\n")


if __name__ == "__main__":
    main()

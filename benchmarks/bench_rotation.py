"""What round robin's shared rotation costs and how often it repeats a choice.

Several frontend processes draw round robin's tickets from one mapped counter without a lock
(`frontend.rotation`). This prints:

1. microseconds per `RoundRobinRouter.choose` over 8 workers: the process's own count (one
   frontend process), the shared counter, and the shared counter under an exclusive `flock`
   (the lock it does not take), alternated over `--rounds` rounds, per round as ratios to
   the own count, with the load average;
2. repeated tickets when `--processes` processes draw at once: flat out (every process
   drawing back to back, the worst case) and paced at `--rate` choices a second in all (a
   busy deployment: the scale-out runs reached ~13,000 requests/s on 16 cores). A repeated
   ticket (two processes inside the read-write window, or one descheduled there writing
   back an older value) is one choice that repeats a neighbour's worker.

    python benchmarks/bench_rotation.py [--processes 7] [--rate 10000]

Last line: `rotation own_us=… shared_us=… locked_us=… repeated_flat_out=… repeated_paced=…`
(shares of all draws).
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.discovery import WorkerCard
from frontend.rotation import SharedRotation
from frontend.router import RoundRobinRouter

CARDS = [
    WorkerCard(
        worker_id=f"w{i}",
        role="agg",
        model="m",
        block_size=16,
        subject=f"s{i}",
        abort_subject=f"a{i}",
        capacity=8,
        max_model_len=4096,
    )
    for i in range(8)
]


class LockedRotation:
    """The shared counter behind an exclusive flock: exact, at a system call or two more."""

    def __init__(self, path: str) -> None:
        self._shared = SharedRotation(path)
        self._fd = os.open(path, os.O_RDWR)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            return next(self._shared)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


def per_choose_us(router: RoundRobinRouter, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        router.choose(CARDS, None)
    return (time.perf_counter() - started) / count * 1e6


def draw(
    mode: str, path: str, count: int, gap_s: float, start: float, out: multiprocessing.Queue
) -> None:
    """One process: `count` tickets, one every `gap_s` from `start` (0: back to back), each
    with the monotonic clock (one for all processes) read right after it."""
    rotation: Iterator[int] = {
        "own": itertools.count, "shared": SharedRotation, "locked": LockedRotation
    }[mode](*(() if mode == "own" else (path,)))  # fmt: skip
    while time.time() < start:
        pass
    draws = []
    due = time.perf_counter()
    for _ in range(count):
        if gap_s:
            due += gap_s
            while (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
        draws.append((next(rotation), time.monotonic_ns()))
    out.put(draws)


def draw_together(
    mode: str, processes: int, per_process: int, gap_s: float, folder: str
) -> tuple[float, float]:
    """(repeated tickets, early repeats) as shares of all draws of `processes` processes:
    a ticket drawn twice, and a draw whose worker (of 8) is among the 7 drawn just before
    it by any process (0 for one exact rotation, ~0.66 for independent uniform choices)."""
    path = os.path.join(folder, f"draws-{mode}-{gap_s}")
    SharedRotation(path).close()  # created before anyone draws
    out: multiprocessing.Queue = multiprocessing.Queue()
    start = time.time() + 0.5  # every process mapped the file by then
    workers = [
        multiprocessing.Process(target=draw, args=(mode, path, per_process, gap_s, start, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    draws = [d for _ in workers for d in out.get()]
    for worker in workers:
        worker.join()
    tickets = [ticket for ticket, _ in draws]
    in_order = [ticket % len(CARDS) for ticket, _ in sorted(draws, key=lambda d: d[1])]
    early = sum(w in in_order[max(0, i - len(CARDS) + 1) : i] for i, w in enumerate(in_order))
    return 1 - len(set(tickets)) / len(tickets), early / len(in_order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=7)
    parser.add_argument("--rate", type=float, default=10000.0, help="paced: choices/s in all")
    parser.add_argument("--paced-s", type=float, default=3.0)
    parser.add_argument("--flat-out", type=int, default=200000, help="tickets per process")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chooses", type=int, default=200000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        kinds = {
            "own": RoundRobinRouter(),
            "shared": RoundRobinRouter(SharedRotation(os.path.join(folder, "shared"))),
            "locked": RoundRobinRouter(LockedRotation(os.path.join(folder, "locked"))),
        }
        timings: dict[str, list[float]] = {name: [] for name in kinds}
        for round_ in range(args.rounds):
            names = list(kinds)[round_ % 3 :] + list(kinds)[: round_ % 3]  # rotating order
            for name in names:
                timings[name].append(per_choose_us(kinds[name], args.chooses))
            own = timings["own"][-1]
            shared, locked = timings["shared"][-1] / own, timings["locked"][-1] / own
            print(f"round {round_}: choose own {own:.3f} us, shared x{shared:.2f}, "
                  f"locked x{locked:.2f}; load {os.getloadavg()[0]:.2f}")  # fmt: skip
        us = {name: statistics.median(values) for name, values in timings.items()}
        print("choose, median over rounds: " + ", ".join(f"{k} {v:.3f} us" for k, v in us.items()))
        per_process = int(args.rate * args.paced_s / args.processes)
        found = {}
        for mode, gap_s, count in (
            ("shared", 0.0, args.flat_out),
            ("own", args.processes / args.rate, per_process),
            ("shared", args.processes / args.rate, per_process),
            ("locked", args.processes / args.rate, per_process),
        ):
            found[mode, gap_s] = repeated, early = draw_together(
                mode, args.processes, count, gap_s, folder
            )
            pace = f"at {args.rate:.0f} choices/s in all" if gap_s else "flat out"
            print(f"{args.processes} processes, {mode} rotation, {pace}, {count} draws each: "
                  f"repeated tickets {repeated:.2e}, early repeats {early:.2e} of the draws; "
                  f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    gap = args.processes / args.rate
    print(f"rotation own_us={us['own']:.3f} shared_us={us['shared']:.3f} "
          f"locked_us={us['locked']:.3f} "
          f"early_flat_out={found['shared', 0.0][1]:.2e} early_paced={found['shared', gap][1]:.2e} "
          f"early_paced_own={found['own', gap][1]:.2e} "
          f"early_paced_locked={found['locked', gap][1]:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()

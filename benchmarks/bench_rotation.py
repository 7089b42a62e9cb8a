"""What round robin's shared rotation costs, and what its lock buys.

Several frontend processes draw round robin's tickets from one counter file under a `flock`
(`frontend.rotation`). This prints:

1. microseconds per `RoundRobinRouter.choose` over 8 workers: the process's own count (one
   frontend process), the shared counter (flock'd) and the same counter without the lock,
   alternated over `--rounds` rounds, per round as ratios to the own count, with the load
   average;
2. `--processes` processes drawing together, flat out (back to back) and paced at `--rate`
   choices a second in all (the scale-out runs reached ~13,000 requests/s on 16 cores) with
   every process due at the same instants (as a lockstep client's requests arrive), for the
   own counts (what each process did before), the unlocked and the shared counter (and
   the shared one waiting for a held lock asleep at once instead of retrying first):
   repeated tickets (an unlocked read-write window two processes shared, or a process
   descheduled there writing back an older value), early repeats (a draw whose worker is
   among the 7 drawn just before it by any process, in the clock's order: 0 for one exact
   rotation, ~0.66 for independent uniform choices; the clock read after each draw puts a
   floor under it), and the slowest draws (a process waiting for the lock).

    python benchmarks/bench_rotation.py [--processes 7] [--rate 10000]

Last line: `rotation own_us=… shared_us=… unlocked_us=… early_paced_own=…
early_paced_unlocked=… early_paced_shared=… shared_draw_p999_us=… sleeping_draw_p999_us=…`
(the p99.9 draws paced).
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


class UnlockedRotation(SharedRotation):
    """The shared counter read and written without the lock (the first version)."""

    def __next__(self) -> int:
        counter = self._counter
        ticket = counter[0]
        counter[0] = ticket + 1
        return ticket


class SleepingRotation(SharedRotation):
    """The shared counter, waiting for a held lock asleep in the kernel at once."""

    def _lock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)


def rotation(mode: str, path: str) -> Iterator[int]:
    if mode == "own":
        return itertools.count()
    kinds = {"shared": SharedRotation, "sleeping": SleepingRotation}
    return kinds.get(mode, UnlockedRotation)(path)


def per_choose_us(router: RoundRobinRouter, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        router.choose(CARDS, None)
    return (time.perf_counter() - started) / count * 1e6


def draw(
    mode: str, path: str, count: int, gap_s: float, start: float, out: multiprocessing.Queue
) -> None:
    """One process: `count` tickets, one every `gap_s` from `start` (0: back to back); each
    with the monotonic clock (one for all processes) read after it and its duration."""
    tickets = rotation(mode, path)
    while time.time() < start:
        pass
    draws = []
    due = time.perf_counter()
    for _ in range(count):
        if gap_s:
            due += gap_s
            while (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
        t0 = time.perf_counter_ns()
        ticket = next(tickets)
        draws.append((ticket, time.monotonic_ns(), time.perf_counter_ns() - t0))
    out.put(draws)


def draw_together(
    mode: str, processes: int, per_process: int, gap_s: float, folder: str
) -> tuple[float, float, float, float]:
    """(repeated tickets, early repeats, p99.9 and max draw µs) of `processes` processes."""
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
    tickets = [ticket for ticket, _, _ in draws]
    in_order = [ticket % len(CARDS) for ticket, _, _ in sorted(draws, key=lambda d: d[1])]
    window = len(CARDS) - 1
    early = sum(w in in_order[max(0, i - window) : i] for i, w in enumerate(in_order))
    took = sorted(ns / 1e3 for _, _, ns in draws)
    return (
        1 - len(set(tickets)) / len(tickets),
        early / len(in_order),
        took[int(0.999 * (len(took) - 1))],
        took[-1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=7)
    parser.add_argument("--rate", type=float, default=10000.0, help="paced: choices/s in all")
    parser.add_argument("--paced-s", type=float, default=3.0)
    parser.add_argument("--flat-out", type=int, default=50000, help="tickets per process")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chooses", type=int, default=200000)
    args = parser.parse_args()
    modes = ("own", "shared", "unlocked")
    with tempfile.TemporaryDirectory() as folder:
        routers = {mode: RoundRobinRouter(rotation(mode, f"{folder}/{mode}")) for mode in modes}
        timings: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            for mode in modes[round_ % 3 :] + modes[: round_ % 3]:  # rotating order
                timings[mode].append(per_choose_us(routers[mode], args.chooses))
            own = timings["own"][-1]
            shared, unlocked = timings["shared"][-1] / own, timings["unlocked"][-1] / own
            print(f"round {round_}: choose own {own:.3f} us, shared x{shared:.2f}, "
                  f"unlocked x{unlocked:.2f}; load {os.getloadavg()[0]:.2f}")  # fmt: skip
        us = {mode: statistics.median(values) for mode, values in timings.items()}
        print("choose, median over rounds: " + ", ".join(f"{k} {v:.3f} us" for k, v in us.items()))
        gap = args.processes / args.rate
        paced = int(args.rate * args.paced_s / args.processes)
        found = {}
        drawing = (*modes, "sleeping")
        for mode, gap_s, count in [(m, 0.0, args.flat_out) for m in drawing[1:]] + [
            (m, gap, paced) for m in drawing
        ]:
            found[mode, gap_s] = repeated, early, p999, most = draw_together(
                mode, args.processes, count, gap_s, folder
            )
            pace = f"at {args.rate:.0f}/s in all" if gap_s else "flat out"
            print(f"{args.processes} processes, {mode:<8} {pace:<16} {count:>6} draws each: "
                  f"repeated tickets {repeated:.2e}, early repeats {early:.2e}; draw p99.9 "
                  f"{p999:.1f} us, max {most:.0f} us; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"rotation own_us={us['own']:.3f} shared_us={us['shared']:.3f} "
          f"unlocked_us={us['unlocked']:.3f} early_paced_own={found['own', gap][1]:.2e} "
          f"early_paced_unlocked={found['unlocked', gap][1]:.2e} "
          f"early_paced_shared={found['shared', gap][1]:.2e} "
          f"shared_draw_p999_us={found['shared', gap][2]:.0f} "
          f"sleeping_draw_p999_us={found['sleeping', gap][2]:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()

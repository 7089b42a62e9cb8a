"""Which CPUs slow which: one CPU's pure-Python loop timed alone and beside one other busy CPU.

A virtual machine may show its CPUs as independent cores (no siblings in /sys) while the host
runs two of them on one physical core's hyperthreads. Then a frontend pinned to a CPU of its
own still shares execution units with whatever runs on its hidden sibling, and its CPU time
per request rises with the load there (`bench_frontend.py --pin`'s busy-CPU slowdown shows the
sum of such effects; this shows the pairs).

    python benchmarks/cpu_pairs.py [--ref 15 14 13] [--rounds 2]

Per reference CPU it prints the loop's time beside each other busy CPU as a ratio to the time
alone (1.00: independent; ~1.2-1.6: siblings of one core) and the CPUs above `--threshold`.
Last line: `cpu_pairs ref=<cpu>:<partners> ...` (partners: the CPUs above the threshold).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time


def spin_once(cpu: int, iterations: int = 1_000_000) -> float:
    """Seconds a fixed pure-Python loop (dict updates) takes on `cpu` (this process)."""
    os.sched_setaffinity(0, {cpu})
    table: dict[int, int] = {}
    t0 = time.perf_counter()
    for i in range(iterations):
        table[i & 1023] = table.get(i & 1023, 0) + i
    return time.perf_counter() - t0


def _spin_until(cpu: int, stop: multiprocessing.synchronize.Event) -> None:
    os.sched_setaffinity(0, {cpu})
    table: dict[int, int] = {}
    i = 0
    while not stop.is_set():
        for _ in range(10_000):
            table[i & 1023] = table.get(i & 1023, 0) + i
            i += 1


def slowdown_beside(ref: int, other: int, rounds: int) -> float:
    """Time of the loop on `ref` while `other` spins, over its time alone measured just
    before (best of `rounds` each: the host's own load drifts between pairs)."""
    alone = min(spin_once(ref) for _ in range(rounds))
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin_until, args=(other, stop), daemon=True)
    spinner.start()
    try:
        spin_once(other, 10_000)  # nothing: lets the spinner get going
        os.sched_setaffinity(0, {ref})
        beside = min(spin_once(ref) for _ in range(rounds))
    finally:
        stop.set()
        spinner.join(5)
    return beside / alone


def pair_slowdowns(ref: int, cpus: list[int], rounds: int) -> dict[int, float]:
    """`slowdown_beside` for every CPU of `cpus` other than `ref`."""
    spin_once(ref)  # warm: the first run of a fresh process is slower
    return {other: slowdown_beside(ref, other, rounds) for other in cpus if other != ref}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cpus = sorted(os.sched_getaffinity(0))
    parser.add_argument("--ref", type=int, nargs="+", default=cpus[-3:])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=1.15)
    args = parser.parse_args()
    summary = []
    for ref in args.ref:
        ratios = pair_slowdowns(ref, cpus, args.rounds)
        partners = [cpu for cpu, ratio in ratios.items() if ratio >= args.threshold]
        row = " ".join(f"{cpu}:{ratio:.2f}" for cpu, ratio in ratios.items())
        print(f"CPU {ref} beside each busy CPU (time / alone): {row}")
        summary.append(f"ref={ref}:{','.join(map(str, partners)) or '-'}")
    print("cpu_pairs " + " ".join(summary))


if __name__ == "__main__":
    main()

"""How fast this machine's CPUs run while a benchmark row runs, against their speed at rest.

On the device machine's 16-CPU guest a saturated frontend's CPU time per request rises
x1.3-2 from 1 to 8 frontend processes although its work per request is the same, and a
pure-Python loop runs x1.2-1.6 as long with every CPU busy as alone (a shared turbo budget,
caches, the host's other guests: invisible from inside). A sweep row's ratio to N=1 mixes
both. This probe separates them: a child process on one CPU times a fixed loop (dict updates,
the interpreter's own kind of work) by its *CPU time* every `every_s`, so that waiting for
the CPU does not count, only how fast the CPU runs while it has it. A row's median over the
idle median is the factor by which that row's CPUs were slower; the frontends' CPU per
request divided by it is their work per request in idle-CPU units.

It costs its CPU about `iterations` loops every `every_s` (~10 % of one CPU).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event


def loop_cpu_seconds(iterations: int) -> float:
    """CPU seconds this thread spends on a fixed pure-Python loop."""
    table: dict[int, int] = {}
    t0 = time.thread_time()
    for i in range(iterations):
        table[i & 1023] = table.get(i & 1023, 0) + i
    return time.thread_time() - t0


def _probe(cpu: int, iterations: int, every_s: float, stop: Event, out: Connection) -> None:
    """The child: time the loop on `cpu` until `stop`, then send the timings."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    samples = []
    while True:
        samples.append(loop_cpu_seconds(iterations))
        if stop.wait(every_s):
            break
    out.send(samples)
    out.close()


class CpuProbe:
    """Times the loop on `cpu` while a block runs (`running`); `idle_s` is the loop's median
    CPU time at rest (`calibrate`, before any load), `slowdown` a block's median over it."""

    def __init__(self, cpu: int, iterations: int = 100_000, every_s: float = 0.1) -> None:
        self.cpu = cpu
        self.iterations = iterations
        self.every_s = every_s
        self.idle_s = float("nan")

    def calibrate(self, seconds: float = 1.0) -> float:
        """The loop's median CPU time on an idle machine (call before starting the load)."""
        with self.running() as samples:
            time.sleep(seconds)
        self.idle_s = statistics.median(samples)
        return self.idle_s

    @contextlib.contextmanager
    def running(self) -> Iterator[list[float]]:
        """Probe while the block runs; the yielded list holds the loop's CPU times after it."""
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_probe, args=(self.cpu, self.iterations, self.every_s, stop, send), daemon=True
        )
        samples: list[float] = []
        child.start()
        send.close()
        try:
            yield samples
        finally:
            stop.set()
            if receive.poll(30):
                samples.extend(receive.recv())
            child.join(10)
            receive.close()

    def slowdown(self, samples: list[float]) -> float:
        """How many times as long the loop took in `samples` as at rest (nan: no figure)."""
        if not samples or math.isnan(self.idle_s):  # not calibrated
            return float("nan")
        return statistics.median(samples) / self.idle_s

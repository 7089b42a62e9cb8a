"""benchmarks/cpu_probe.py: how fast a CPU runs, by the probe loop's own CPU time."""

from __future__ import annotations

import math
import multiprocessing
import os

import pytest

from benchmarks.cpu_probe import CpuProbe, loop_cpu_seconds


def _busy(cpu: int, stop) -> None:  # type: ignore[no-untyped-def]
    os.sched_setaffinity(0, {cpu})
    while not stop.is_set():
        loop_cpu_seconds(10_000)


def test_uncalibrated_or_empty_gives_no_figure() -> None:
    probe = CpuProbe(0)
    assert math.isnan(probe.slowdown([0.01]))
    probe.idle_s = 0.01
    assert math.isnan(probe.slowdown([]))
    assert probe.slowdown([0.02, 0.01, 0.03]) == pytest.approx(2.0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_a_shared_cpu_is_not_a_slow_cpu() -> None:
    """Another process spinning on the probe's CPU halves the probe's share of it, not its
    speed: the probe times CPU time, so the slowdown stays near 1 (wall time would read ~2)."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    probe = CpuProbe(cpu, iterations=50_000, every_s=0.02)
    idle = probe.calibrate(0.5)
    assert idle > 0
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    hog = context.Process(target=_busy, args=(cpu, stop), daemon=True)
    hog.start()
    try:
        with probe.running() as samples:
            hog.join(0.8)
    finally:
        stop.set()
        hog.join(10)
    assert len(samples) >= 3
    assert 0.6 < probe.slowdown(samples) < 1.5

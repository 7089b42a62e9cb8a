"""benchmarks/proc_counters.py: the sweep's per-process work counters, on a real child process."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.proc_counters import ProcessWork, Work

# reads a pipe one byte per read(2) until it closes, after saying it is ready
CHILD = """
import os, sys
sys.stdout.write("ready\\n"); sys.stdout.flush()
while os.read(0, 1):
    pass
"""


def test_counts_a_childs_reads_and_sleeps() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == b"ready\n"
        counted = ProcessWork([child.pid])
        before = counted.take()[0]
        deadline = time.monotonic() + 20
        for sent in range(1, 51):  # each byte once the last is read: the child waits in read(2)
            child.stdin.write(b"x")
            child.stdin.flush()
            while (counted.take()[0] - before).read_bytes < sent and time.monotonic() < deadline:
                time.sleep(0.001)
        work = counted.take()[0] - before
        counted.close()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert work.read_bytes >= 50
    assert work.read_calls >= 50
    assert work.voluntary_switches >= 10  # asleep in read(2) before most bytes
    if counted.perf_error is None:  # hardware counters where the machine has them
        assert work.instructions > 0 and work.cycles > 0


def test_a_process_gone_counts_zero_and_work_adds_up() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=10)
    assert ProcessWork([child.pid]).take() == [Work()]
    one = Work(read_calls=2, write_calls=1, instructions=10)
    assert one + one - one == one
    assert (one + one).read_calls == 4

"""bench_frontend --pin: the CPU layout it reads from /sys and gives the processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_frontend import (
    SCENARIOS,
    CpuLayout,
    Result,
    apply_layout,
    busy_seconds_by_cpu,
    parse_cpu_list,
    physical_cores,
    plan_pinning,
    what_bounds,
    whole_cores_fit,
)


def fake_sys(root: Path, siblings: dict[int, str]) -> Path:
    """A /sys/devices/system/cpu with these thread_siblings_list contents."""
    for cpu, listed in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(listed + "\n")
    return root


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("5") == [5]


def test_physical_cores_keep_hyperthread_siblings_together(tmp_path: Path) -> None:
    """16 CPUs, 8 cores, siblings n and n+8 (how Linux numbers them on x86 servers)."""
    root = fake_sys(tmp_path, {cpu: f"{cpu % 8},{cpu % 8 + 8}" for cpu in range(16)})
    cores = physical_cores(set(range(16)), root)
    assert cores == [(n, n + 8) for n in range(8)]
    # only the CPUs this process may use count; a sibling outside them is not a CPU here
    assert physical_cores({0, 8, 3}, root) == [(0, 8), (3,)]
    # no topology readable: each CPU a core of its own
    assert physical_cores({0, 1}, tmp_path / "missing") == [(0,), (1,)]


def test_whole_cores_while_the_rest_keeps_half() -> None:
    cores = [(n, n + 8) for n in range(8)]
    assert whole_cores_fit(cores, 4, rest_min=8)
    assert not whole_cores_fit(cores, 8, rest_min=8)  # 8 whole cores leave nothing
    layout = plan_pinning(cores, 4, rest_min=8, whole_cores=True)
    assert layout.frontends == ((7, 15), (6, 14), (5, 13), (4, 12))
    assert sorted(layout.rest) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert layout.whole_cores


def test_one_hyperthread_each_on_its_own_core() -> None:
    """8 frontends on 8 cores of 2 hyperthreads: one CPU each, no two frontends on one core,
    their siblings to the rest."""
    cores = [(n, n + 8) for n in range(8)]
    layout = plan_pinning(cores, 8, rest_min=8, whole_cores=False)
    assert layout.frontends == tuple((n,) for n in range(7, -1, -1))
    assert sorted(layout.rest) == list(range(8, 16))
    physical = {cpu: index for index, core in enumerate(cores) for cpu in core}
    assert len({physical[cpus[0]] for cpus in layout.frontends}) == 8
    assert not set(layout.rest) & {cpu for cpus in layout.frontends for cpu in cpus}


def test_no_hyperthreads_cpu_zero_last() -> None:
    cores = [(n,) for n in range(16)]
    layout = plan_pinning(cores, 2, rest_min=8, whole_cores=True)
    assert layout.frontends == ((15,), (14,))
    assert layout.rest == tuple(range(14))
    assert "rest (14 CPUs) 0-13" in layout.describe()


def test_refuses_a_layout_that_starves_the_rest() -> None:
    with pytest.raises(ValueError, match="leave 6 CPUs"):
        plan_pinning([(n,) for n in range(16)], 10, rest_min=8, whole_cores=True)
    with pytest.raises(ValueError, match="physical cores"):
        plan_pinning([(0, 1), (2, 3)], 3, rest_min=0, whole_cores=False)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two CPUs",
)
def test_apply_layout_pins_processes_their_threads_and_children() -> None:
    """A frontend stand-in (with a thread and a child process) goes to its CPU, another
    process to the rest; this process goes to the rest too (its load clients inherit it)."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    before = os.sched_getaffinity(0)
    code = (
        "import subprocess, sys, threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('up', flush=True); time.sleep(60)\n"
    )
    frontend = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child = 0
    try:
        assert frontend.stdout is not None and frontend.stdout.readline() == "up\n"
        apply_layout(CpuLayout(((second,),), (first,), False), [frontend.pid], [other.pid])
        tasks = [int(t) for t in os.listdir(f"/proc/{frontend.pid}/task")]
        assert len(tasks) >= 2
        assert all(os.sched_getaffinity(t) == {second} for t in tasks)
        child = int(Path(f"/proc/{frontend.pid}/task/{frontend.pid}/children").read_text())
        assert os.sched_getaffinity(child) == {second}
        assert os.sched_getaffinity(other.pid) == {first}
        assert os.sched_getaffinity(0) == {first}
    finally:
        for task in os.listdir(f"/proc/{os.getpid()}/task"):
            os.sched_setaffinity(int(task), before)
        if not child:  # the stand-in's own child, started before "up"
            listed = Path(f"/proc/{frontend.pid}/task/{frontend.pid}/children").read_text()
            child = int(listed.split()[0]) if listed.split() else 0
        if child:
            os.kill(child, signal.SIGKILL)
        for process in (frontend, other):
            process.kill()
            process.wait()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_cpu_speed_when_busy_is_a_ratio_to_one_cpu_alone() -> None:
    """The calibration --pin prints: one CPU alone against every CPU at once (a ratio of
    seconds, so never far below 1: running together cannot make a CPU faster)."""
    from benchmarks.bench_frontend import cpu_speed_when_busy

    cpus = sorted(os.sched_getaffinity(0))[:2]
    mean, worst = cpu_speed_when_busy(cpus)
    assert 0.5 < mean <= worst


def sweep_result(**each: object) -> Result:
    """A 10-second scenario's figures: CPU seconds per process and per CPU."""
    fields: dict = dict(frontend_cpu_each=(9.5, 9.6), worker_cpu_each=(5.0, 5.0),
                        client_cpu_each=(2.0,), busy_each_cpu={})  # fmt: skip
    fields.update(each)
    return Result(
        SCENARIOS[0], 10_000, 10.0, [0.01], sum(fields["frontend_cpu_each"]),
        sum(fields["worker_cpu_each"]), client_cpu_s=sum(fields["client_cpu_each"]),
        other_cpu_s=1.0, **fields,
    )  # fmt: skip


def test_what_bounds_a_sweep_row() -> None:
    """Frontends saturated and nothing shared full: the frontends; a worker or client process
    at its CPU's limit or the rest's CPUs full (by /proc/stat): the stack, named; frontends
    with CPU to spare and nothing full: neither."""
    layout = CpuLayout(((15,), (14,)), tuple(range(14)), False)
    quiet = {cpu: 3.0 for cpu in range(14)} | {14: 9.6, 15: 9.5}
    assert what_bounds(sweep_result(busy_each_cpu=quiet), layout) == "frontends"
    assert what_bounds(sweep_result(worker_cpu_each=(9.2, 3.0), busy_each_cpu=quiet),
                       layout) == "stack: a worker"  # fmt: skip
    assert what_bounds(sweep_result(client_cpu_each=(9.5,)), layout) == "stack: a client"
    full = {cpu: 9.5 for cpu in range(14)}
    assert what_bounds(sweep_result(busy_each_cpu=full), layout).startswith(
        "stack: the rest's CPUs (13.3 of 14 busy)"
    )
    # unpinned: the whole machine's CPUs
    assert "the machine" in what_bounds(sweep_result(busy_each_cpu=full), None)
    idle = sweep_result(frontend_cpu_each=(9.5, 4.0), busy_each_cpu=quiet)
    assert what_bounds(idle, layout) == "neither (a frontend at 0.40)"


def test_busy_seconds_by_cpu_reads_proc_stat(tmp_path: Path) -> None:
    """Busy is all but idle and iowait (steal too: time the CPU was not ours), per CPU."""
    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(
        f"cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 {ticks} 0 {ticks} 500 7 0 0 0 0 0\n"
        f"cpu3 0 0 0 100 0 {ticks} {ticks} {ticks} 0 0\nintr 1 2 3\n"
    )
    assert busy_seconds_by_cpu(stat) == {0: 2.0, 3: 3.0}
    assert busy_seconds_by_cpu(tmp_path / "missing") == {}


def test_sweep_summary_ratios_per_pass_and_mean(capsys: pytest.CaptureFixture[str]) -> None:
    """A scenario's rows of every width form one table (their names differ in concurrency
    only); each pass against its own N=1, the mean against N=1's mean; the router's line
    lists the widths where the frontends set the rate."""
    from benchmarks.bench_frontend import SweepRow, summarize

    rows = [
        SweepRow("kv", 1, 0, "non-stream 16 tok", 1000.0, 0.3, "frontends"),
        SweepRow("kv", 2, 0, "non-stream 16 tok", 1500.0, 0.4, "frontends"),
        SweepRow("kv", 2, 1, "non-stream 16 tok", 2100.0, 0.3, "stack: a worker"),
        SweepRow("kv", 1, 1, "non-stream 16 tok", 1200.0, 0.3, "frontends"),
    ]
    summarize(rows)
    out = capsys.readouterr().out
    assert out.count("kv, non-stream 16 tok") == 1
    line = next(x for x in out.splitlines() if x.strip().startswith("2 "))
    assert "x1.50 x1.75" in line and "x1.64" in line and line.split()[6:8] == ["1.6", "yes"]
    assert "frontends; stack: a worker" in line
    assert "router=kv frontend_bound_widths=1,2 stack_bound_rows=1/4" in out


def test_several_clients_rate_over_the_union_of_their_runs() -> None:
    """Two client processes of 1 s each, the second started 0.5 s later: their requests
    were answered in 1.5 s, not in the longest part's 1 s (which overstated req/s by 1.5)."""
    from benchmarks.bench_frontend import Load, union_wall_s

    def part(start: float) -> Load:
        return Load([0.01] * 100, 1.0, 0, 0.1, {}, {}, started_at=start, ended_at=start + 1.0)

    assert union_wall_s([part(100.0), part(100.5)]) == pytest.approx(1.5)
    unknown = Load([0.01] * 100, 1.2, 0, 0.1, {}, {})  # aiohttp: no times recorded
    assert union_wall_s([part(100.0), unknown]) == pytest.approx(1.2)


def test_a_failed_row_is_said_and_the_sweep_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deployment answering an error (RuntimeError from the load client) ends its row
    only: the other rows are summarized and the failure named at the end."""
    import argparse
    import asyncio

    from benchmarks import bench_frontend
    from benchmarks.bench_frontend import SweepRow

    async def row(_args, _plan, router: str, count: int, run: int) -> list[SweepRow]:  # type: ignore[no-untyped-def]
        if (router, count) == ("kv", 2):
            raise RuntimeError("HTTP 500: internal error")
        return [SweepRow(router, count, run, "non-stream 16 tok", 1000.0 * count, 0.3,
                         "frontends")]  # fmt: skip

    monkeypatch.setattr(bench_frontend, "sweep_row", row)
    args = argparse.Namespace(pin=False, routers=["round_robin", "kv"], router="kv", passes=1,
                              sweep=[1, 2])  # fmt: skip
    asyncio.run(bench_frontend.sweep(args))
    out = capsys.readouterr().out
    assert "failed_row router kv N=2 pass 0: HTTP 500" in out
    assert "router=round_robin frontend_bound_widths=1,2" in out
    assert "router=kv frontend_bound_widths=1 " in out


def test_sweep_summary_shows_the_work_per_request_by_width(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Rows that counted the frontends' work give one line per width, the passes' mean of
    each count: the same work at every width, or more of it."""
    from benchmarks.bench_frontend import WORK_COUNTS, SweepRow, summarize

    def row(width: int, run: int, user: float, kib: float) -> SweepRow:
        return SweepRow("kv", width, run, "stream 32 tok", 1000.0 * width, user, "frontends",
                        (user, 0.02, 1.1, 6.1, kib, 0.05))  # fmt: skip

    summarize([row(1, 0, 0.30, 0.60), row(1, 1, 0.32, 0.62), row(8, 0, 0.40, 0.70),
               row(8, 1, 0.44, 0.74)])  # fmt: skip
    out = capsys.readouterr().out
    assert f"frontend work per request (passes' mean): {', '.join(WORK_COUNTS)}" in out
    lines = [x.split() for x in out.splitlines()]
    assert ["1", "0.310", "0.020", "1.100", "6.100", "0.610", "0.050"] in lines
    assert ["8", "0.420", "0.020", "1.100", "6.100", "0.720", "0.050"] in lines


def test_scale_ab_verdict_counts_only_rounds_bound_by_the_frontends(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A round whose all side left the frontends CPU to spare says nothing of their
    scale-out: the verdict's ratio is the median of the saturated rounds alone, and with
    none, the ratio is printed as a floor the goal cannot be judged on."""
    from benchmarks.bench_frontend import scale_ab_verdict

    field = scale_ab_verdict("non-stream 16 tok", "kv", 8, [5.0, 6.6, 7.0, 3.0],
                             [0.7, 0.95, 0.97, 0.5])  # fmt: skip
    printed = capsys.readouterr().out
    assert field == "kv_non_stream=6.80"
    assert "of the 2 rounds bound by the frontends x6.80 (goal >= 6.4: met)" in printed

    field = scale_ab_verdict("stream 32 tok", "round_robin", 8, [4.0, 5.0], [0.6, 0.7])
    printed = capsys.readouterr().out
    assert field == "round_robin_stream>=4.50(stack-bound)"
    assert "not measurable here" in printed and "met)" not in printed


@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_IDLE is Linux's")
def test_idle_spinners_run_at_sched_idle_on_every_cpu_and_stop() -> None:
    """--spin-idle: one SCHED_IDLE process on each CPU while inside, each gone after."""
    from benchmarks.bench_frontend import idle_spinners

    with idle_spinners(True) as spinners:
        assert len(spinners) == len(os.sched_getaffinity(0))
        assert {os.sched_getscheduler(pid) for pid in spinners} == {os.SCHED_IDLE}
        pinned = sorted(cpu for pid in spinners for cpu in os.sched_getaffinity(pid))
        assert pinned == sorted(os.sched_getaffinity(0))
    for pid in spinners:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with idle_spinners(False) as none:
        assert none == []

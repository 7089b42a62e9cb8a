"""The frontend's cost per request, side by side with NVIDIA Dynamo's, and its scale-out.

Both stacks serve eight simulated workers on this machine, one stack at a time, under the
same load from an aiohttp client in this process (chat requests, fixed output lengths):

- hpcserve: `hpcserve up configs/local-mocker-kv.yaml` (the launcher, in this process) with
  `engine.mocker.speedup` high, so the frontend and the workers' request path are what is
  measured, not the simulated GPU time;
- Dynamo 1.6.1: `python -m dynamo.mocker --num-workers 8 --speedup-ratio 1000 --model-path M
  --discovery-backend file` and `python -m dynamo.frontend --discovery-backend file` from a
  separate venv (`--dynamo-venv`, default /work/dynvenv; made by
  `python -m venv V && V/bin/pip install --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1`
  plus their dependencies except `aisimulate`). Missing: that half is skipped, said so.

Both use the same router (`--router kv`: frontend.router kv, Dynamo `--router-mode kv`;
`--router round_robin`: Dynamo's default) and the same `--speedup` (engine.mocker.speedup,
Dynamo's `--speedup-ratio`).

Per scenario (non-stream 16 tokens at c=64, stream 32 tokens at c=64, non-stream 16 tokens
at c=1) it prints req/s, latency p50/p99, and CPU per request: the frontend process(es)' and
the workers' user+system CPU time (/proc) during the scenario divided by its requests; for
streams also the SSE events per request (how finely each stack cut them: at speedup 1000 a
whole request takes a fraction of a millisecond of simulated time). For hpcserve it also
calls one worker directly over NATS at c=1 (the "added latency" baseline), and times the same
client against a bare uvicorn app (the HTTP floor: what any Python front door costs here).
The last line: `frontend_vs_dynamo cpu_per_req_ratio=<x> stream_req_s_ratio=<y>` (x: hpcserve
frontend CPU per streamed request / Dynamo's; y: hpcserve streamed req/s / Dynamo's).

    python benchmarks/bench_frontend.py [--requests 1500] [--router kv|round_robin] \
        [--speedup 1000] [--dynamo-venv /work/dynvenv]

`--workers-sweep` instead measures hpcserve's throughput with frontend.workers = 1, 2, 4, 8
(give it a machine with the cores: ~16; on 2 cores it only shows contention), each width a
deployment of its own, the load from `benchmarks/http_load.py` (`--client raw`, ~0.04 ms of
CPU a request against aiohttp's ~0.2: the client is not what it measures):

    python benchmarks/bench_frontend.py --workers-sweep --pin --sweep 1 2 4 6 8 \
        --routers round_robin kv --passes 2 --sim-workers 4 --client-processes 4 \
        --concurrency 32 --concurrency-per-process --skip-c1 [--requests 12000]

(`--concurrency-per-process`: N processes get N x --concurrency in flight, so each process
runs at the same load; a process's CPU per request grows as its load falls, see README.)
`--pin` (Linux) gives each frontend process CPUs of its own and everything else (this
process, its load clients, the simulated workers, NATS, etcd) the rest, so that the sweep
measures the frontends with the cores they are given rather than the machine: the layout,
read from /sys (hyperthread siblings), is printed; see `plan_pinning`. `--passes` runs the
widths up, then down, and so on, the routers' order alternating by width. Each row says what
bound it (`what_bounds`: the frontends, or a shared part at its limit: a stack-bound row
measures the simulated stack, not the frontends' scale-out). A row's rate is over the union
of its client processes' runs (they start together). Each row also prints what the frontends
did per request in counts a slower CPU does not change (`benchmarks/proc_counters.py`:
syscalls, bytes in, user/kernel CPU, sleeps): counts flat while CPU per request rises means the
same work ran slower. `--new-prompts REPEAT` numbers each request's prompt anew (the default
question is cached after the first request, so the KV events carry nothing). The summary
gives per router and scenario each width's req/s, its ratio to N=1 per pass and the passes'
mean ratio, the work per request by width, and one line per router:
`frontend_workers_sweep router=<r> frontend_bound_widths=1,2,... stack_bound_rows=<k>/<rows>`.

`--ab-tree CHECKOUT` instead measures the c=1 added latency of this tree's frontend (A) and
of CHECKOUT's (B: the code before a change, or this tree with `--ab-set KEY=VALUE` config
overrides), both serving one deployment at once, in alternated blocks (the worker called
directly and the bare uvicorn app in the same rotation):

    python benchmarks/bench_frontend.py --ab-tree /path/to/old [--ab-rounds 6] [--ab-block 200]
    python benchmarks/bench_frontend.py --ab-tree . --ab-set frontend.busy_poll_us=2000

Last line there: `frontend_c1_ab a_added_ms=... b_added_ms=... b_over_a=...`.
Its requests repeat one question, so the frontend's tokenizer finds every piece of the
prompt cached; `--ab-new-prompts` numbers each question instead (each prompt new, as a
new user's: the user's text is tokenized every time; the system prompt stays cached).

`--scale-ab N` measures the scale-out of N frontend processes inside one deployment: process
0 loaded alone against all N loaded, alternated `--ab-rounds` times, so both sides see the
host of the same minute (a sweep's N=1 row is another deployment at another moment). A round
counts for the goal (>= 0.8·N) only where the all side kept the frontends saturated; below
that the rest of the stack set the pace and the ratio is a floor. `--spin-idle` keeps every
CPU busy on both sides (SCHED_IDLE spinners), for hosts whose CPUs slow each other down:

    python benchmarks/bench_frontend.py --scale-ab 8 --pin --routers kv round_robin \
        --client-processes 4 --sim-workers 6 --concurrency 32 --requests 2500 --ab-rounds 4

Last line there: `frontend_scale_ab n=N <router>_<scenario>=<ratio>` (`>=<ratio>(stack-bound)`
where no round was bound by the frontends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.http_load import NUMBER_MARK, run_raw
from benchmarks.proc_counters import ProcessWork, Work
from contract import bus
from contract.config import default_model_dir, load_config
from contract.messages import GenerateOutput, GenerateRequest, SamplingParams
from contract.readiness import free_port, http_ok, port_open
from hpcserve.launcher import start_deployment, stop_deployment

REPO = Path(__file__).resolve().parents[1]
DYNAMO_ROUTER = {"kv": "kv", "round_robin": "round-robin"}  # frontend.router -> --router-mode
QUESTION = "Explain in one paragraph why the sky looks blue during the day."


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    max_tokens: int
    concurrency: int
    share: float  # of --requests


SCENARIOS = (
    Scenario("non-stream 16 tok c=64", False, 16, 64, 1.0),
    Scenario("stream 32 tok c=64", True, 32, 64, 1.0),
    Scenario("non-stream 16 tok c=1", False, 16, 1, 0.15),
)


@dataclass
class Result:
    scenario: Scenario
    requests: int
    wall_s: float
    latencies: list[float]
    frontend_cpu_s: float
    worker_cpu_s: float
    sse_events: int = 0  # streamed scenarios: `data:` events received in all
    client_cpu_s: float = 0.0  # the load clients' own CPU
    other_cpu_s: float = 0.0  # the rest of the stack (NATS, etcd)
    frontend_cpu_each: tuple[float, ...] = ()  # per frontend process
    served_each: tuple[int, ...] = ()  # requests answered per frontend process (several)
    connections_each: tuple[int, ...] = ()  # client connections per frontend process
    worker_cpu_each: tuple[float, ...] = ()  # per simulated worker process
    client_cpu_each: tuple[float, ...] = ()  # per load client process
    other_cpu_each: dict[str, float] = field(default_factory=dict)  # nats, etcd, ...
    busy_each_cpu: dict[int, float] = field(default_factory=dict)  # /proc/stat, all processes
    start_spread_s: float = 0.0  # between the client processes' first requests
    frontend_work: Work = field(default_factory=Work)  # the frontends' counters, summed
    other_work: dict[str, Work] = field(default_factory=dict)  # nats, etcd: the same
    perf_error: str | None = None  # why there are no instruction counts

    def cores(self, cpu_s: float) -> float:
        """CPU seconds spent during the scenario as cores kept busy on average."""
        return cpu_s / self.wall_s

    @property
    def req_s(self) -> float:
        return self.requests / self.wall_s

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def frontend_ms_per_req(self) -> float:
        return 1000 * self.frontend_cpu_s / self.requests

    @property
    def events_per_req(self) -> float:
        return self.sse_events / self.requests if self.scenario.stream else float("nan")

    @property
    def worker_ms_per_req(self) -> float:
        return 1000 * self.worker_cpu_s / self.requests


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their children (Linux /proc)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        for task in [pid, *_descendants(pid)]:
            try:
                fields = Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def busy_seconds_by_cpu(stat: Path = Path("/proc/stat")) -> dict[int, float]:
    """Seconds each CPU has been busy since boot (all but idle and iowait, /proc/stat): what
    any process or the kernel (the loopback network's softirqs too) spent there."""
    ticks = os.sysconf("SC_CLK_TCK")
    busy: dict[int, float] = {}
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return busy
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
        busy[int(name[3:])] = (user + nice + system + irq + softirq + steal) / ticks
    return busy


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = [int(child) for child in children]
    for child in list(found):
        found += _descendants(child)
    return found


# ---- CPU pinning (--pin) ---------------------------------------------------------------


def parse_cpu_list(text: str) -> list[int]:
    """A kernel CPU list ("0-3,8,10-11") as CPU numbers."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def physical_cores(
    cpus: set[int], sys_cpu: Path = Path("/sys/devices/system/cpu")
) -> list[tuple[int, ...]]:
    """`cpus` grouped by physical core (hyperthread siblings in one tuple), read from
    /sys/devices/system/cpu/cpuN/topology/thread_siblings_list; a CPU whose topology is not
    readable is a core of its own. Ordered by each core's lowest CPU."""
    cores: dict[tuple[int, ...], None] = {}
    for cpu in sorted(cpus):
        try:
            listed = (sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
            siblings = tuple(sorted(c for c in parse_cpu_list(listed) if c in cpus)) or (cpu,)
        except (OSError, ValueError):
            siblings = (cpu,)
        cores[siblings] = None
    return sorted(cores, key=lambda core: core[0])


@dataclass(frozen=True)
class CpuLayout:
    """Which CPUs each frontend process may run on, and which the rest of the stack may."""

    frontends: tuple[tuple[int, ...], ...]
    rest: tuple[int, ...]
    whole_cores: bool  # each frontend has a whole physical core (its siblings idle)

    def describe(self) -> str:
        each = "; ".join(
            f"frontend-{i} CPU {','.join(map(str, cpus))}" for i, cpus in enumerate(self.frontends)
        )
        return f"{each}; rest ({len(self.rest)} CPUs) {_cpu_ranges(self.rest)}"


def _cpu_ranges(cpus: tuple[int, ...]) -> str:
    """CPU numbers in the kernel's list form: 0-7,12."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def whole_cores_fit(cores: list[tuple[int, ...]], frontends: int, rest_min: int) -> bool:
    """Whether `frontends` whole physical cores can go to the frontends leaving the rest at
    least `rest_min` CPUs."""
    if frontends > len(cores):
        return False
    taken = sum(len(core) for core in cores[len(cores) - frontends :])
    return sum(len(core) for core in cores) - taken >= rest_min


def plan_pinning(
    cores: list[tuple[int, ...]], frontends: int, rest_min: int, whole_cores: bool
) -> CpuLayout:
    """Frontend i gets the i-th physical core from the top (CPU 0's core, where the kernel
    does most of its own work, is the last one taken): with `whole_cores` all of that core's
    hyperthreads, so no other process shares its execution units; otherwise one hyperthread of
    it, its siblings going to the rest (each frontend still on a core of its own, beside the
    rest's work). The rest gets every other CPU. A sweep decides `whole_cores` once, for its
    widest row (`whole_cores_fit`), so that its rows differ only in the number of frontends.
    ValueError where the rest would keep fewer than `rest_min` CPUs."""
    if frontends > len(cores):
        raise ValueError(
            f"--pin: {frontends} frontend processes need {frontends} physical cores, "
            f"this machine has {len(cores)}"
        )
    given = list(reversed(cores[len(cores) - frontends :]))
    mine = [core if whole_cores else core[:1] for core in given]
    taken = {cpu for cpus in mine for cpu in cpus}
    rest = tuple(cpu for core in cores for cpu in core if cpu not in taken)
    if len(rest) < rest_min:
        raise ValueError(
            f"--pin: {frontends} frontend processes would leave {len(rest)} CPUs for the "
            f"clients, workers, NATS and etcd (--pin-rest-min {rest_min})"
        )
    return CpuLayout(tuple(mine), rest, whole_cores)


def pin_process(pid: int, cpus: tuple[int, ...]) -> None:
    """Every thread of `pid` and of its descendants may run only on `cpus` (threads and
    processes they start later inherit it)."""
    for process in [pid, *_descendants(pid)]:
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{process}/task")]
        except OSError:
            continue  # gone meanwhile
        for thread in threads:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(thread, cpus)


def _spin(cpu: int) -> float:
    """Seconds a fixed pure-Python loop (dict updates, the interpreter's own kind of work)
    takes on `cpu`."""
    os.sched_setaffinity(0, {cpu})
    table: dict[int, int] = {}
    t0 = time.perf_counter()
    for i in range(2_000_000):
        table[i & 1023] = table.get(i & 1023, 0) + i
    return time.perf_counter() - t0


def cpu_speed_when_busy(cpus: list[int]) -> tuple[float, float]:
    """How much slower one CPU runs the same loop when all of `cpus` run it at once than
    when it runs alone (mean and slowest CPU, as time ratios). Above 1: the CPUs share
    something underneath (a virtual machine's CPUs on one physical core's hyperthreads, a
    shared turbo budget), so N busy frontend CPUs are not N times one."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(cpus)) as pool:
        alone = min(pool.submit(_spin, cpus[-1]).result() for _ in range(2))
        together = list(pool.map(_spin, cpus))
    return sum(together) / len(together) / alone, max(together) / alone


def _spin_idle(cpu: int, ready: Any) -> None:
    """Spin on `cpu` at SCHED_IDLE: any runnable process of the stack preempts it, yet the CPU
    never idles, so the host's shared budget (turbo, power, a virtual machine's neighbours)
    sees every CPU busy whether one frontend is loaded or all of them."""
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    ready.put(cpu)
    while True:
        pass


@contextlib.contextmanager
def idle_spinners(enabled: bool) -> Iterator[list[int]]:
    """--spin-idle: one `_spin_idle` process on each CPU this process may use (their PIDs
    yielded), stopped on the way out."""
    if not enabled:
        yield []
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    spinners = [context.Process(target=_spin_idle, args=(cpu, ready), daemon=True)
                for cpu in sorted(os.sched_getaffinity(0))]  # fmt: skip
    for spinner in spinners:
        spinner.start()
    try:
        for _ in spinners:  # each pinned and at SCHED_IDLE before anything is measured
            ready.get(timeout=60)
        yield [spinner.pid for spinner in spinners if spinner.pid is not None]
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.join()


def apply_layout(layout: CpuLayout, frontend_pids: list[int], other_pids: list[int]) -> None:
    """This process (and so the load clients it starts from now on) and `other_pids` on the
    rest's CPUs, frontend process i on its own."""
    if len(frontend_pids) != len(layout.frontends):
        raise ValueError(f"{len(frontend_pids)} frontend processes, a layout for "
                         f"{len(layout.frontends)}")  # fmt: skip
    pin_process(os.getpid(), layout.rest)
    for pid in other_pids:
        pin_process(pid, layout.rest)
    for pid, cpus in zip(frontend_pids, layout.frontends, strict=True):
        pin_process(pid, cpus)


# ---- load --------------------------------------------------------------------------------


PROCESS_HEADER = "X-Hpcserve-Frontend"  # which of several frontend processes answered


@dataclass
class Load:
    """What one client saw: latencies, wall seconds, SSE events (how finely each stack cut its
    streams), its own CPU seconds, and per frontend process (several only): requests answered
    and the distinct connections that carried them."""

    latencies: list[float]
    wall_s: float
    events: int
    client_cpu_s: float
    per_process: dict[str, int]
    connections: dict[str, set[int]]
    client_cpu_each: tuple[float, ...] = ()  # several client processes: each one's CPU
    started_at: float = 0.0  # time.monotonic() of its first request (raw clients; 0: unknown)
    ended_at: float = 0.0
    start_spread_s: float = 0.0  # several client processes: their first requests' spread


async def drive(url: str, model: str, scenario: Scenario, count: int) -> Load:
    """`count` chat requests, `scenario.concurrency` at a time."""
    cpu0 = time.process_time()
    per_process: dict[str, int] = {}
    connections: dict[str, set[int]] = {}
    body = chat_body(model, scenario)
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    remaining = count
    events = 0
    connector = aiohttp.TCPConnector(limit=scenario.concurrency)

    async def on_headers(_session: object, _context: object, params: object) -> None:
        """Which frontend process answered, over which connection (while it is attached)."""
        response = params.response  # type: ignore[attr-defined]
        process = response.headers.get(PROCESS_HEADER)
        if process is not None:
            per_process[process] = per_process.get(process, 0) + 1
            # the connection may be back in the pool already (a body read with the headers)
            protocol = getattr(response, "_protocol", None)  # aiohttp's, set in start()
            if protocol is not None:
                connections.setdefault(process, set()).add(id(protocol))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_headers)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:

        async def one_client() -> None:
            nonlocal remaining, events
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    data = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
                if scenario.stream:
                    if not data.rstrip().endswith(b"data: [DONE]"):
                        raise RuntimeError(f"stream did not end with [DONE]: {data[-200:]!r}")
                    events += data.count(b"data: ")
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(scenario.concurrency)))
        wall = time.perf_counter() - t0
    return Load(latencies, wall, events, time.process_time() - cpu0, per_process, connections)


NEW_PROMPTS: list[int] = []  # --new-prompts REPEAT: [REPEAT] (the raw clients only)


def chat_body(model: str, scenario: Scenario) -> bytes:
    """The one chat request every load client sends in `scenario`; with `--new-prompts`,
    its question is numbered anew each request (http_load's NUMBER_MARK) and repeated, so
    every prompt's blocks after the chat template's head are new to every worker."""
    content = QUESTION
    if NEW_PROMPTS:
        content = NUMBER_MARK.decode() + " " + " ".join([QUESTION] * NEW_PROMPTS[0])
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": scenario.max_tokens,
            "ignore_eos": True,
            "stream": scenario.stream,
        }
    )


# --client: aiohttp (`drive`), http_load's cheap one, or that one with its connections
# spread evenly over the frontend processes (`http_load.balanced_sockets`)
CLIENTS = ("aiohttp", "raw", "balanced")


def drive_raw_client(
    url: str,
    model: str,
    scenario: Scenario,
    count: int,
    balance_over: int = 0,
    start_at: float | None = None,
    only: str | None = None,
) -> Load:
    """`count` requests of `scenario` from `http_load` (a client ~5x cheaper per request than
    aiohttp: see that module), in a fresh event loop of this process; with `balance_over`,
    as many connections to each of that many frontend processes (`only`: all to that one)."""
    out = run_raw(url, chat_body(model, scenario), scenario.concurrency, count, scenario.stream,
                  balance_over, start_at, only)  # fmt: skip
    return Load(out.latencies, out.wall_s, out.events, out.cpu_s, out.per_process,
                out.connections, started_at=out.started_at, ended_at=out.ended_at)  # fmt: skip


def _drive_in_process(
    url: str,
    model: str,
    scenario: Scenario,
    count: int,
    client: str,
    frontends: int,
    start_at: float | None = None,
    only: str | None = None,
) -> Load:
    if client in ("raw", "balanced"):
        balance = frontends if client == "balanced" else 0
        return drive_raw_client(url, model, scenario, count, balance, start_at, only)
    return asyncio.run(drive(url, model, scenario, count))


async def drive_from(
    processes: int,
    url: str,
    model: str,
    scenario: Scenario,
    count: int,
    client: str = "aiohttp",
    frontends: int = 1,
    only: str | None = None,
) -> Load:
    """`drive` (or `client` "raw"/"balanced": `http_load`'s client, "balanced" spreading
    each client process's connections evenly over `frontends` processes, or with `only` all
    to that one) split over `processes` client processes (one Python client tops out near a
    core's worth of requests: too few for several frontend processes on many cores)."""
    if processes <= 1 or scenario.concurrency < processes:
        if client != "aiohttp":
            return await asyncio.to_thread(
                _drive_in_process, url, model, scenario, count, client, frontends, None, only
            )
        return await drive(url, model, scenario, count)
    from concurrent.futures import ProcessPoolExecutor

    share = Scenario(scenario.name, scenario.stream, scenario.max_tokens,
                     scenario.concurrency // processes, scenario.share)  # fmt: skip
    loop = asyncio.get_running_loop()
    start_at = time.monotonic() + CLIENT_START_LEAD_S  # the raw clients start together
    with ProcessPoolExecutor(processes) as pool:
        parts = await asyncio.gather(*(
            loop.run_in_executor(pool, _drive_in_process, url, model, share,
                                 count // processes, client, frontends, start_at, only)
            for _ in range(processes)
        ))  # fmt: skip
    per_process: dict[str, int] = {}
    connections: dict[str, set[int]] = {}
    for index, part in enumerate(parts):
        for process, served in part.per_process.items():
            per_process[process] = per_process.get(process, 0) + served
        for process, seen in part.connections.items():  # ids are per client process
            connections.setdefault(process, set()).update((index, c) for c in seen)
    return Load(
        [t for part in parts for t in part.latencies],
        union_wall_s(parts),
        sum(part.events for part in parts),
        sum(part.client_cpu_s for part in parts),
        per_process,
        connections,
        tuple(part.client_cpu_s for part in parts),
        start_spread_s=max(p.started_at for p in parts) - min(p.started_at for p in parts),
    )


CLIENT_START_LEAD_S = 0.5  # client processes start, connect and balance within it (N <= 8)


def union_wall_s(parts: list[Load]) -> float:
    """The seconds from the first client process's first request to the last one's end: the
    window all of the parts' requests were answered in. The longest part alone understates it
    when the parts ran staggered (balancing takes each its own time), and that overstated
    req/s most where runs are short: the widest rows (benchmarks/README.md, branch scale2).
    Parts that did not record their times (aiohttp): the longest part's wall."""
    if all(part.started_at and part.ended_at for part in parts):
        return max(p.ended_at for p in parts) - min(p.started_at for p in parts)
    return max(part.wall_s for part in parts)


async def measure(
    url: str,
    model: str,
    frontend_pids: list[int],
    worker_pids: list[int],
    requests: int,
    client_processes: int = 1,
    other_pids: list[int] | None = None,
    concurrency: int = 64,
    other_names: list[str] | None = None,
    scenarios: tuple[Scenario, ...] = SCENARIOS,
    client: str = "aiohttp",
) -> list[Result]:
    """The scenarios in turn; CPU of each frontend, worker, client and other process
    (`other_names`: what each of `other_pids` is, e.g. nats, etcd) per scenario; the load
    from `client` (CLIENTS)."""
    await drive(url, model, SCENARIOS[1], 64)  # warm-up: connections, caches, JITs
    others = other_pids or []
    names = other_names or [str(pid) for pid in others]
    results = []
    counted = ProcessWork(frontend_pids + others)
    for scenario in scenarios:
        if scenario.concurrency > 1 and concurrency != scenario.concurrency:
            name = scenario.name.replace(f"c={scenario.concurrency}", f"c={concurrency}")
            scenario = Scenario(name, scenario.stream, scenario.max_tokens, concurrency,
                                scenario.share)  # fmt: skip
        count = max(20, int(requests * scenario.share))
        busy0, window0 = busy_seconds_by_cpu(), time.perf_counter()
        fe0 = [cpu_seconds([pid]) for pid in frontend_pids]
        wk0 = [cpu_seconds([pid]) for pid in worker_pids]
        ot0 = [cpu_seconds([pid]) for pid in others]
        work0 = counted.take()
        load = await drive_from(client_processes, url, model, scenario, count, client,
                                len(frontend_pids))  # fmt: skip
        fe = [cpu_seconds([pid]) - before for pid, before in zip(frontend_pids, fe0, strict=True)]
        work = [after - before for after, before in zip(counted.take(), work0, strict=True)]
        wk_each = [cpu_seconds([p]) - before for p, before in zip(worker_pids, wk0, strict=True)]
        ot_each = [cpu_seconds([p]) - before for p, before in zip(others, ot0, strict=True)]
        # busy seconds over the clients' own wall time (`cores` divides by it): the window
        # also held the client processes' start and connection set-up
        scale = load.wall_s / max(1e-9, time.perf_counter() - window0)
        busy = {cpu: (t - busy0.get(cpu, t)) * scale for cpu, t in busy_seconds_by_cpu().items()}
        wk, ot = sum(wk_each), sum(ot_each)
        served = tuple(load.per_process.get(str(i), 0) for i in range(len(frontend_pids)))
        conns = tuple(len(load.connections.get(str(i), ())) for i in range(len(frontend_pids)))
        results.append(Result(scenario, len(load.latencies), load.wall_s, load.latencies, sum(fe),
                              wk, load.events, load.client_cpu_s, ot, tuple(fe), served,
                              conns, tuple(wk_each), load.client_cpu_each or (load.client_cpu_s,),
                              dict(zip(names, ot_each, strict=True)), busy,
                              start_spread_s=load.start_spread_s,
                              frontend_work=sum(work[:len(frontend_pids)], Work()),
                              other_work=dict(zip(names, work[len(frontend_pids):], strict=True)),
                              perf_error=counted.perf_error))  # fmt: skip
    counted.close()
    return results


async def direct_worker_p50(nats_url: str, subject: str, count: int) -> float:
    """p50 of a 16-token request sent straight to one mocker worker over NATS (no frontend)."""
    latencies = await direct_worker_latencies(nats_url, subject, count)
    return sorted(latencies)[len(latencies) // 2]


async def direct_worker_latencies(nats_url: str, subject: str, count: int) -> list[float]:
    """`count` 16-token requests sent straight to one mocker worker over NATS, one at a time."""
    import nats

    nc = await nats.connect(nats_url)
    inbox = nc.new_inbox()
    done: asyncio.Queue[None] = asyncio.Queue()

    async def on_reply(msg) -> None:  # type: ignore[no-untyped-def]
        if GenerateOutput.model_validate_json(msg.data).finish_reason is not None:
            done.put_nowait(None)

    await nc.subscribe(f"{inbox}.>", cb=on_reply)
    latencies = []
    for _ in range(count):
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            token_ids=list(range(100, 130)),
            sampling=SamplingParams(max_tokens=16, ignore_eos=True),
        )
        t0 = time.perf_counter()
        await nc.publish(subject, request.model_dump_json().encode(),
                         reply=f"{inbox}.{request.request_id}")  # fmt: skip
        await done.get()
        latencies.append(time.perf_counter() - t0)
    await nc.close()
    return latencies


_BARE_APP = """
import sys, uvicorn
BODY = b'{"id": "chatcmpl-0", "object": "chat.completion", "choices": [{"index": 0, ' \\
       b'"message": {"role": "assistant", "content": "' + b"x" * 80 + b'"}}]}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
            lifespan="off", access_log=False, log_level="warning")
"""


async def http_floor_p50(count: int) -> float:
    """p50 of the same c=1 chat POST against a bare uvicorn app (uvloop, httptools, a fixed
    small JSON answer): what any Python HTTP front door costs this client and machine."""
    async with bare_uvicorn() as url:
        scenario = Scenario("bare", False, 16, 1, 1.0)
        await drive(url, "bare", scenario, 50)
        latencies = (await drive(url, "bare", scenario, count)).latencies
        return sorted(latencies)[len(latencies) // 2]


@contextlib.asynccontextmanager
async def bare_uvicorn():
    """The bare uvicorn app of `http_floor_p50` on a free port; yields its URL."""
    port = free_port("127.0.0.1")
    server = subprocess.Popen([sys.executable, "-c", _BARE_APP, str(port)])
    try:
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(port_open, "127.0.0.1", port):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the bare uvicorn app did not come up")
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        server.terminate()
        server.wait(10)


# ---- the two stacks ----------------------------------------------------------------------


def hpcserve_config(frontend_workers: int, speedup: float, router: str = "kv"):
    return load_config(
        REPO / "configs" / "local-mocker-kv.yaml",
        [
            "frontend.port=0",
            f"frontend.workers={frontend_workers}",
            f"engine.mocker.speedup={speedup}",
            f"frontend.router={router}",
            *EXTRA_SETTINGS,
        ],
    )


EXTRA_SETTINGS: list[str] = []  # --set: more config overrides of the hpcserve stack


async def run_hpcserve(
    requests: int,
    frontend_workers: int,
    speedup: float,
    direct: bool,
    client_processes: int = 1,
    router: str = "kv",
    concurrency: int = 64,
    layout: CpuLayout | None = None,
    scenarios: tuple[Scenario, ...] = SCENARIOS,
    client: str = "aiohttp",
):
    """One deployment measured; with `layout`, its processes pinned to it first (--pin)."""
    config = hpcserve_config(frontend_workers, speedup, router)
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    try:
        pids = {planned.name: managed.pid for planned, managed in deployment.processes}
        frontends = [pid for name, pid in pids.items() if name.startswith("frontend")]
        workers = [pid for name, pid in pids.items() if name.startswith("worker-")]
        other_names = [name for name, pid in pids.items() if pid not in frontends + workers]
        others = [pids[name] for name in other_names]
        if layout is not None:
            apply_layout(layout, frontends, workers + others)
        url = deployment.url + "/chat/completions"
        model = deployment.config.model.served_name or Path(str(deployment.config.model.path)).name
        results = await measure(url, model, frontends, workers, requests, client_processes,
                                others, concurrency, other_names, scenarios,
                                client)  # fmt: skip
        direct_p50 = None
        if direct:
            assert deployment.config.services.nats.endpoint
            subject = bus.worker_subject(deployment.config.name, "agg-g0-i0")
            direct_p50 = await direct_worker_p50(
                deployment.config.services.nats.endpoint, subject, max(20, requests // 7)
            )
        return results, direct_p50
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)


@contextlib.contextmanager
def dynamo_stack(venv: Path, model_dir: Path, workdir: Path, speedup: float, router: str):
    """Dynamo's mocker (8 workers) and frontend on a free port; yields (url, model, pids)."""
    python = venv / "bin" / "python"
    port = free_port("127.0.0.1")
    env = dict(os.environ, DYN_FILE_DISCOVERY_DIR=str(workdir / "discovery"))
    env.pop("PYTHONPATH", None)
    procs = []
    try:
        for name, argv in (
            ("mocker", ["-m", "dynamo.mocker", "--num-workers", "8",
                        "--speedup-ratio", f"{speedup:g}",
                        "--model-path", str(model_dir), "--discovery-backend", "file"]),
            ("frontend", ["-m", "dynamo.frontend", "--discovery-backend", "file",
                          "--http-port", str(port), "--router-mode", DYNAMO_ROUTER[router]]),
        ):  # fmt: skip
            log = (workdir / f"dynamo-{name}.log").open("w")
            command, tmp = [str(python), *argv], workdir
            procs.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _dynamo_ready(url, str(model_dir)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"Dynamo did not come up; logs in {workdir}")
            time.sleep(0.2)
        yield url + "/v1/chat/completions", str(model_dir), [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _dynamo_ready(url: str, model: str) -> bool:
    if not http_ok(url + "/v1/models"):
        return False
    import httpx

    try:
        data = httpx.get(url + "/v1/models", timeout=2).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return any(entry["id"] == model for entry in data)


async def run_dynamo(venv: Path, requests: int, speedup: float, router: str) -> list[Result] | None:
    if not (venv / "bin" / "python").is_file():
        print(f"Dynamo half skipped: no venv at {venv} (see this script's docstring)")
        return None
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import dynamo.frontend"],
                           capture_output=True, text=True)  # fmt: skip
    if check.returncode != 0:
        print(f"Dynamo half skipped: {venv} cannot import dynamo.frontend: {check.stderr[-300:]}")
        return None
    with (
        tempfile.TemporaryDirectory(prefix="bench-dynamo-") as tmp,
        dynamo_stack(venv, default_model_dir(), Path(tmp), speedup, router) as (url, model, pids),
    ):
        frontend_pid, mocker_pid = pids[1], pids[0]
        return await measure(url, model, [frontend_pid], [mocker_pid], requests)


# ---- c=1 A/B: this tree's frontend beside another tree's -----------------------------------


async def drive_new_prompts(url: str, model: str, count: int, first: int) -> list[float]:
    """`count` c=1 chat requests (16 tokens, not streamed) whose questions are numbered from
    `first`: no prompt repeats, so none is found whole in the tokenizer's piece cache."""
    latencies: list[float] = []
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for number in range(first, first + count):
            content = f"{QUESTION} (question {number})"
            body = orjson.dumps({"model": model, "max_tokens": 16, "ignore_eos": True,
                                 "messages": [{"role": "user", "content": content}]})  # fmt: skip
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                data = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
            latencies.append(time.perf_counter() - t0)
    return latencies


@contextlib.contextmanager
def frontend_from(tree: Path, config_file: Path, log: Path, overrides: list[str]):
    """A second frontend process, run from `tree` (another checkout: the code before a
    change; or this one with other settings, `overrides`), serving the same deployment (its
    config file) on a free port; yields (its URL, its pid)."""
    port = free_port("127.0.0.1")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])
    )
    argv = [sys.executable, "-m", "frontend", "--config", str(config_file),
            "--set", f"frontend.port={port}", "--log-level", "warning"]  # fmt: skip
    for override in overrides:
        argv += ["--set", override]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not http_ok(url + "/health"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the frontend from {tree} did not come up; log {log}")
            time.sleep(0.1)
        yield url + "/v1/chat/completions", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def c1_ab(args: argparse.Namespace) -> None:
    """c=1 added latency of this tree's frontend (A) and of `--ab-tree`'s with `--ab-set`
    overrides (B), both serving one deployment at once, in alternated blocks (so both see
    the same machine load), with the worker called directly and the bare uvicorn app in
    the same rotation."""
    config = hpcserve_config(1, args.speedup, args.router)
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    block, rounds = args.ab_block, args.ab_rounds
    try:
        model = deployment.config.model.served_name or Path(str(deployment.config.model.path)).name
        assert deployment.config.services.nats.endpoint
        nats_url = deployment.config.services.nats.endpoint
        subject = bus.worker_subject(deployment.config.name, "agg-g0-i0")
        log = deployment.run_dir / "logs" / "frontend-ab.log"
        tree = Path(args.ab_tree).resolve()
        # B's config: what differs from the defaults (an older tree's schema may not know
        # a newer field, even at its default)
        config_b = deployment.run_dir / "config-b.yaml"
        resolved = deployment.config.model_dump(mode="json", exclude_defaults=True)
        config_b.write_text(yaml.safe_dump(resolved, sort_keys=False))
        pid_a = next(m.pid for p, m in deployment.processes if p.name.startswith("frontend"))
        with frontend_from(tree, config_b, log, args.ab_set) as (other, pid_b):
            pids = {"A": pid_a, "B": pid_b}
            cpu: dict[str, float] = {"A": 0.0, "B": 0.0}  # their CPU seconds in the blocks
            async with bare_uvicorn() as bare:
                urls = {"A": deployment.url + "/chat/completions", "B": other, "bare": bare}
                scenario = Scenario("c1", False, 16, 1, 1.0)
                for url in urls.values():
                    await drive(url, model, SCENARIOS[1] if url != bare else scenario, 64)
                    await drive(url, model, scenario, 50)
                await direct_worker_latencies(nats_url, subject, 50)
                latencies: dict[str, list[list[float]]] = {k: [] for k in (*urls, "direct")}
                for index in range(rounds):
                    order = ["B", "A"] if index % 2 == 0 else ["A", "B"]
                    for name in [*order, "bare"]:
                        before = cpu_seconds([pids[name]]) if name in pids else 0.0
                        if args.ab_new_prompts and name in pids:  # A and B get the same ones
                            first = (index + 1) * block
                            times = await drive_new_prompts(urls[name], model, block, first)
                        else:
                            times = (await drive(urls[name], model, scenario, block)).latencies
                        latencies[name].append(times)
                        if name in pids:
                            cpu[name] += cpu_seconds([pids[name]]) - before
                    latencies["direct"].append(
                        await direct_worker_latencies(nats_url, subject, block)
                    )
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)

    def p50(values: list[float]) -> float:
        return 1000 * sorted(values)[len(values) // 2]

    print(f"c=1 A/B, {rounds} rounds of {block} requests each (p50 ms; added = p50 - direct)")
    print(f"  A: this tree's frontend; B: {tree}'s, settings {' '.join(args.ab_set) or 'same'}"
          f"; prompts {'new each request' if args.ab_new_prompts else 'one repeated'}")  # fmt: skip
    print(f"  {'round':<6} {'A':>7} {'B':>7} {'direct':>7} {'bare':>7} "
          f"{'A added':>10} {'B added':>10} {'B/A':>8}")  # fmt: skip
    for index in range(rounds):
        a, b, direct, bare_ms = (p50(latencies[k][index]) for k in ("A", "B", "direct", "bare"))
        ratio = (b - direct) / (a - direct)
        print(f"  {index:<6} {a:7.3f} {b:7.3f} {direct:7.3f} {bare_ms:7.3f} "
              f"{a - direct:10.3f} {b - direct:10.3f} {ratio:8.2f}")  # fmt: skip
    every = {k: p50([t for part in v for t in part]) for k, v in latencies.items()}
    a_added, b_added = every["A"] - every["direct"], every["B"] - every["direct"]
    print(f"  {'all':<6} {every['A']:7.3f} {every['B']:7.3f} {every['direct']:7.3f} "
          f"{every['bare']:7.3f} {a_added:10.3f} {b_added:10.3f} "
          f"{b_added / a_added:8.2f}")  # fmt: skip
    cpu_a, cpu_b = (1000 * cpu[k] / (rounds * block) for k in ("A", "B"))
    print(f"  frontend CPU per c=1 request (ms): A {cpu_a:.3f}, B {cpu_b:.3f}")
    print(
        f"frontend_c1_ab a_added_ms={a_added:.3f} b_added_ms={b_added:.3f} "
        f"b_over_a={b_added / a_added:.2f} a_cpu_ms={cpu_a:.3f} b_cpu_ms={cpu_b:.3f} "
        f"b_cpu_over_a={cpu_b / cpu_a:.2f} bare_ms={every['bare']:.3f} cores={os.cpu_count()}"
    )


# ---- report ------------------------------------------------------------------------------


def table(label: str, results: list[Result]) -> None:
    print(f"\n{label}")
    print(f"  {'scenario':<24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'frontend CPU ms/req':>20} {'worker CPU ms/req':>18} {'events/req':>10}")  # fmt: skip
    for r in results:
        print(f"  {r.scenario.name:<24} {r.req_s:8.0f} {1000 * r.p(0.5):8.2f} "
              f"{1000 * r.p(0.99):8.2f} {r.frontend_ms_per_req:20.3f} "
              f"{r.worker_ms_per_req:18.3f} {r.events_per_req:10.1f}")  # fmt: skip


async def compare(args: argparse.Namespace) -> None:
    ours, direct_p50 = await run_hpcserve(
        args.requests, args.frontend_workers, args.speedup, True, router=args.router
    )
    table(f"hpcserve (local-mocker-kv, 8 mockers, speedup {args.speedup:g}, "
          f"frontend.workers={args.frontend_workers}, router {args.router})", ours)  # fmt: skip
    c1 = ours[2]
    if direct_p50 is not None:
        floor = await http_floor_p50(c1.requests)
        print(f"  c=1 added latency p50: {1000 * (c1.p(0.5) - direct_p50):.2f} ms "
              f"(worker called directly over NATS: {1000 * direct_p50:.2f} ms; this client "
              f"against a bare uvicorn app: {1000 * floor:.2f} ms)")  # fmt: skip
    theirs = None
    if not args.skip_dynamo:
        theirs = await run_dynamo(Path(args.dynamo_venv), args.requests, args.speedup, args.router)
    if theirs is None:
        print("frontend_vs_dynamo skipped=1 (no Dynamo run)")
        return
    table(f"Dynamo 1.6.1 (dynamo.mocker --num-workers 8 --speedup-ratio {args.speedup:g}, "
          f"router {DYNAMO_ROUTER[args.router]})", theirs)  # fmt: skip
    print("\nhpcserve / Dynamo per scenario (CPU per request: lower is better):")
    for a, b in zip(ours, theirs, strict=True):
        print(f"  {a.scenario.name:<24} req/s {a.req_s / b.req_s:5.2f}x  "
              f"frontend CPU/req {a.frontend_ms_per_req / b.frontend_ms_per_req:5.2f}x  "
              f"worker CPU/req {a.worker_ms_per_req / b.worker_ms_per_req:5.2f}x")  # fmt: skip
    cpu_ratio = ours[1].frontend_ms_per_req / theirs[1].frontend_ms_per_req
    nonstream_cpu_ratio = ours[0].frontend_ms_per_req / theirs[0].frontend_ms_per_req
    print(f"frontend_vs_dynamo cpu_per_req_ratio={cpu_ratio:.2f} "
          f"nonstream_cpu_per_req_ratio={nonstream_cpu_ratio:.2f} "
          f"stream_req_s_ratio={ours[1].req_s / theirs[1].req_s:.2f}")  # fmt: skip


def component_line(r: Result) -> str:
    """Each shared part's busiest process (cores) and CPU per request (ms): a process near
    1.00 is at its CPU's limit; a part whose ms/request grows with the rate costs the
    frontends' scale-out (the workers, NATS and the clients serve every frontend)."""

    def spread(values: tuple[float, ...]) -> str:
        if not values:
            return "-"
        return f"{r.cores(min(values)):.2f}-{r.cores(max(values)):.2f}"

    per_req = 1000 / max(1, r.requests)
    others = " ".join(
        f"{name} {r.cores(cpu):.2f} ({cpu * per_req:.3f} ms/req)"
        for name, cpu in r.other_cpu_each.items()
    )
    return (
        f"each: workers {spread(r.worker_cpu_each)} ({r.worker_cpu_s * per_req:.3f} ms/req), "
        f"clients {spread(r.client_cpu_each)} ({r.client_cpu_s * per_req:.3f} ms/req), {others}"
    )


def work_line(r: Result) -> str:
    """What the frontend processes did per request, in counts a slower CPU does not change
    (proc_counters): read/write system calls, bytes in, context switches, and where the
    kernel lets us, user-space instructions and cycles; NATS's bytes out per request beside
    (what it fans out to every subscriber). Counts flat with N and cycles rising: the same
    work ran slower; counts rising: more work per request."""
    w, n = r.frontend_work, max(1, r.requests)
    user, kernel, reads, writes, kib, sleeps = work_counts(r)
    line = (f"frontends per request: user {user:.3f} ms, kernel {kernel:.3f} ms, {reads:.2f} "
            f"reads, {writes:.2f} writes, {kib:.2f} KiB in, {sleeps:.3f} sleeps, "
            f"{w.involuntary_switches / n:.3f} preemptions")  # fmt: skip
    if w.instructions:
        line += (f", {w.instructions / n / 1000:.0f}k instructions, {w.cycles / n / 1000:.0f}k "
                 f"cycles (IPC {w.instructions / max(1, w.cycles):.2f})")  # fmt: skip
    elif r.perf_error:
        line += f" (no instruction counts: {r.perf_error})"
    nats = r.other_work.get("nats")
    if nats is not None:
        line += f"; nats {nats.write_bytes / n / 1024:.2f} KiB out"
    return line


def cores_table(results: list[Result], layout: CpuLayout | None = None) -> None:
    """Where the machine's cores went: a frontend process near 1.0 is saturated; the sum of
    all columns near the core count means the machine, not the frontend, set the rate (with
    --pin: workers + clients + nats/etcd near the rest's CPUs means the rest set it)."""
    print(f"  {'scenario':<24} {'cores busy: frontends (each)':<40} {'workers':>8} "
          f"{'clients':>8} {'nats+etcd':>9} {'total':>6}")  # fmt: skip
    for r in results:
        each = " ".join(f"{r.cores(cpu):.2f}" for cpu in r.frontend_cpu_each)
        parts = (r.frontend_cpu_s, r.worker_cpu_s, r.client_cpu_s, r.other_cpu_s)
        print(f"  {r.scenario.name:<24} {f'{r.cores(r.frontend_cpu_s):.2f} ({each})':<40} "
              f"{r.cores(r.worker_cpu_s):8.2f} {r.cores(r.client_cpu_s):8.2f} "
              f"{r.cores(r.other_cpu_s):9.2f} {r.cores(sum(parts)):6.2f}")  # fmt: skip
        if layout is not None:
            rest = r.cores(r.worker_cpu_s + r.client_cpu_s + r.other_cpu_s)
            seen = r.cores(sum(r.busy_each_cpu.get(cpu, 0.0) for cpu in layout.rest))
            print(f"  {'':<24} the rest: {rest:.2f} of its {len(layout.rest)} CPUs busy "
                  f"({seen:.2f} by /proc/stat: every process and the kernel)")  # fmt: skip
        elif r.busy_each_cpu:
            seen = r.cores(sum(r.busy_each_cpu.values()))
            print(f"  {'':<24} the machine: {seen:.2f} of {len(r.busy_each_cpu)} CPUs busy "
                  "(/proc/stat: every process and the kernel)")  # fmt: skip
        print(f"  {'':<24} {component_line(r)}")
        print(f"  {'':<24} {work_line(r)}")
        if len(r.served_each) > 1:
            shares = " ".join(f"{n / max(1, r.requests):.2f}" for n in r.served_each)
            conns = " ".join(str(n) for n in r.connections_each)
            print(f"  {'':<24} requests share per process: {shares}; connections: {conns}; "
                  f"client processes started within {1000 * r.start_spread_s:.0f} ms")  # fmt: skip


def pinning_plan(args: argparse.Namespace) -> tuple[list[tuple[int, ...]], int, bool, float]:
    """--pin: this machine's cores (the CPUs this process may use, grouped by physical core),
    the CPUs the rest keeps at least, whether each frontend gets a whole physical core
    (decided once for the sweep's widest row), and how much slower a CPU runs with all of
    them busy; printed."""
    cores = physical_cores(os.sched_getaffinity(0))
    cpus = sum(len(core) for core in cores)
    rest_min = args.pin_rest_min if args.pin_rest_min is not None else cpus // 2
    whole = whole_cores_fit(cores, max(args.sweep), rest_min)
    threads = sorted({len(core) for core in cores})
    print(f"--pin: {cpus} CPUs in {len(cores)} physical cores ({'/'.join(map(str, threads))} "
          f"hyperthread(s) a core: {' '.join(_cpu_ranges(core) for core in cores)}); the rest "
          f"keeps >= {rest_min} CPUs; each frontend process gets "
          + ("a whole physical core (its siblings left idle)" if whole and threads != [1]
             else "one CPU of a physical core of its own" + (
                 "" if threads == [1] else " (its sibling CPUs go to the rest)")))  # fmt: skip
    mean, worst = cpu_speed_when_busy([cpu for core in cores for cpu in core])
    print(f"--pin: a pure-Python loop takes x{mean:.2f} as long (slowest CPU x{worst:.2f}) "
          f"when all {cpus} CPUs run it at once as on one CPU alone: above 1, this machine's "
          "CPUs slow each other down (the rows with many busy CPUs run slower CPUs)")  # fmt: skip
    return cores, rest_min, whole, mean


SATURATED = 0.90  # a process busy this share of its one CPU (or more) is at its limit


def what_bounds(r: Result, layout: CpuLayout | None) -> str:
    """What set a sweep row's rate: "frontends" where every frontend process is saturated
    and no shared part is at its limit; otherwise "stack: ..." naming the shared parts at
    their limit (a single-threaded worker or client process at SATURATED; the CPUs the rest
    of the stack may use, or the whole machine unpinned, SATURATED full), or "neither" where
    the frontends had CPU to spare and nothing shared was full (too little load offered). A
    row bound by the stack says nothing of the frontends' scale-out."""
    limits = []
    if r.worker_cpu_each and r.cores(max(r.worker_cpu_each)) >= SATURATED:
        limits.append("a worker")
    if r.client_cpu_each and r.cores(max(r.client_cpu_each)) >= SATURATED:
        limits.append("a client")
    shared = list(layout.rest) if layout is not None else list(r.busy_each_cpu)
    busy = r.cores(sum(r.busy_each_cpu.get(cpu, 0.0) for cpu in shared))
    if shared and busy >= SATURATED * len(shared):
        limits.append(f"the rest's CPUs ({busy:.1f} of {len(shared)} busy)" if layout is not None
                      else f"the machine ({busy:.1f} of {len(shared)} CPUs busy)")  # fmt: skip
    if limits:
        return "stack: " + ", ".join(limits)
    if r.frontend_cpu_each and r.cores(min(r.frontend_cpu_each)) >= SATURATED:
        return "frontends"
    low = min((r.cores(cpu) for cpu in r.frontend_cpu_each), default=0.0)
    return f"neither (a frontend at {low:.2f})"


@dataclass
class SweepRow:
    """One sweep row's figures for the summary: a deployment of `width` frontend processes."""

    router: str
    width: int
    run: int  # which pass of the sweep
    scenario: str  # its name without the concurrency (which grows with the width)
    req_s: float
    frontend_ms: float  # frontend CPU per request
    bound: str  # what_bounds
    # the frontends' work per request (WORK_COUNTS: proc_counters), () where not counted
    counts: tuple[float, ...] = ()


WORK_COUNTS = ("user ms", "kernel ms", "reads", "writes", "KiB in", "sleeps")


def work_counts(r: Result) -> tuple[float, ...]:
    """A row's WORK_COUNTS per request, over all its frontend processes."""
    w, n = r.frontend_work, max(1, r.requests)
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    return (w.user_ticks * tick_ms / n, w.system_ticks * tick_ms / n, w.read_calls / n,
            w.write_calls / n, w.read_bytes / n / 1024, w.voluntary_switches / n)  # fmt: skip


def summarize(rows: list[SweepRow]) -> None:
    """Per router and scenario, each width's req/s per pass and as a ratio to the narrowest
    width of the same pass, and the mean over passes against the narrowest width's mean
    (passes run the widths up and down, so a drift of the machine cancels there), whether
    that reaches 0.8*N, and what bound each pass's row; then one line per router."""
    first = min(row.width for row in rows)
    print(f"\nscale-out (req/s per pass, x the same pass's N={first}; mean: the passes' mean "
          f"over N={first}'s; the goal is >= 0.8*N where the frontends set the rate; stack-bound "
          "rows measure the simulated stack)")  # fmt: skip
    keys = sorted({(row.router, row.scenario) for row in rows})
    for router, scenario in keys:
        print(f"  {router}, {scenario}")
        print(f"    {'N':>3} {'req/s':>18} {'x N=1':>16} {'mean':>6} {'0.8N':>5} {'met':>4} "
              f"{'fe ms/req':>13}  bound by")  # fmt: skip
        mine = [row for row in rows if (row.router, row.scenario) == (router, scenario)]
        base = {row.run: row.req_s for row in mine if row.width == first}
        if not base:  # the narrowest row failed in every pass: no ratio to give
            print(f"    no N={first} row")
            continue
        for width in sorted({row.width for row in mine}):
            at = sorted((row for row in mine if row.width == width), key=lambda row: row.run)
            ratios = [row.req_s / base[row.run] for row in at if row.run in base]
            mean = sum(row.req_s for row in at) / len(at) / (sum(base.values()) / len(base))
            need = 0.8 * width / first
            print(f"    {width:>3} {' '.join(f'{row.req_s:.0f}' for row in at):>18} "
                  f"{' '.join(f'x{x:.2f}' for x in ratios):>16} x{mean:<5.2f} {need:5.1f} "
                  f"{'yes' if mean >= need else 'no':>4} "
                  f"{' '.join(f'{row.frontend_ms:.3f}' for row in at):>13}  "
                  f"{'; '.join(row.bound for row in at)}")  # fmt: skip
        counted = [row for row in mine if row.counts]
        if counted:  # the same work per request at every width, or more of it?
            print(f"    frontend work per request (passes' mean): {', '.join(WORK_COUNTS)}")
            for width in sorted({row.width for row in counted}):
                at = [row.counts for row in counted if row.width == width]
                means = [sum(values) / len(at) for values in zip(*at, strict=True)]
                print(f"    {width:>3} " + " ".join(f"{value:.3f}" for value in means))
    for router in sorted({row.router for row in rows}):
        mine = [row for row in rows if row.router == router]
        fair = [row for row in mine if row.bound == "frontends"]
        widths = sorted({row.width for row in fair})
        print(f"frontend_workers_sweep router={router} frontend_bound_widths="
              f"{','.join(map(str, widths)) or '-'} stack_bound_rows="
              f"{sum(row.bound.startswith('stack') for row in mine)}/{len(mine)}")  # fmt: skip


async def sweep(args: argparse.Namespace) -> None:
    """Each router at each width of `--sweep`, `--passes` times: the widths up then down in
    alternate passes and the routers' order alternating by width, so that a drift of the
    machine falls on both sides; each row its own deployment."""
    plan = pinning_plan(args) if args.pin else None
    routers = args.routers or [args.router]
    rows: list[SweepRow] = []
    failed: list[str] = []  # rows whose deployment answered an error (said, then left out)
    turn = 0
    for run in range(args.passes):
        widths = args.sweep if run % 2 == 0 else list(reversed(args.sweep))
        for count in widths:
            order = routers if turn % 2 == 0 else list(reversed(routers))
            turn += 1
            for router in order:
                try:
                    rows += await sweep_row(args, plan, router, count, run)
                except RuntimeError as exc:  # an error answer: that row, not the sweep, ends
                    failed.append(f"router {router} N={count} pass {run}: {exc}")
                    print(f"row failed: {failed[-1]}")
    summarize(rows)
    for line in failed:
        print(f"frontend_workers_sweep failed_row {line}")


async def scale_ab(args: argparse.Namespace) -> None:
    """--scale-ab N: the scale-out of N frontend processes measured inside one deployment, in
    alternated rounds of two loads: process 0 alone (`--concurrency` connections all to it;
    the others idle, taking in the deployment's events as they would) and all N (as many
    connections on each). Per round req/s all / req/s one, the sides' order alternating:
    both see the same host within seconds. Between deployments the device's host moved a
    sweep's N=1 rows x1.8 (its pure-Python loop x0.92-1.74 as long at different moments),
    which a ratio against another deployment's N=1 cannot tell from scale-out."""
    count = args.scale_ab
    args.sweep = [count]  # the widest row `pinning_plan` plans for
    plan = pinning_plan(args) if args.pin else None
    summary = []
    for router in args.routers or [args.router]:
        layout = None
        if plan is not None:
            cores, rest_min, whole, _ = plan
            layout = plan_pinning(cores, count, rest_min, whole)
        config = hpcserve_config(count, args.speedup, router)
        deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
        try:
            pids = {planned.name: managed.pid for planned, managed in deployment.processes}
            frontends = [pid for name, pid in pids.items() if name.startswith("frontend")]
            others = [pid for pid in pids.values() if pid not in frontends]
            if layout is not None:
                apply_layout(layout, frontends, others)
            url = deployment.url + "/chat/completions"
            model = deployment.config.model.served_name or Path(
                str(deployment.config.model.path)).name  # fmt: skip
            await drive(url, model, SCENARIOS[1], 64)  # warm-up
            where = f"; pinned: {layout.describe()}" if layout is not None else ""
            print(f"\nscale-ab: router {router}, {count} frontend processes, "
                  f"{args.concurrency} connections a loaded process, {os.cpu_count()} CPUs{where}")
            print(f"  {'scenario':<22} {'round':>5} {'one req/s':>10} {'all req/s':>10} "
                  f"{'x':>6} {'fe ms one':>10} {'fe ms all':>10} {'idle fe %':>10} "
                  f"{'fe busy all':>12}  bound")  # fmt: skip
            for base in SCENARIOS[:2]:
                kind = base.name.split(" c=")[0]
                ratios, busy_all = [], []
                for index in range(args.ab_rounds):
                    sides = ("one", "all") if index % 2 == 0 else ("all", "one")
                    rate, fe_ms, idle = {}, {}, 0.0
                    fe_busy = 0.0
                    for side in sides:
                        loaded = count if side == "all" else 1
                        scenario = Scenario(kind, base.stream, base.max_tokens,
                                            args.concurrency * loaded, 1.0)  # fmt: skip
                        before = [cpu_seconds([pid]) for pid in frontends]
                        load = await drive_from(
                            args.client_processes, url, model, scenario,
                            args.requests * loaded, "balanced", count,
                            None if side == "all" else "0",
                        )  # fmt: skip
                        after = [cpu_seconds([pid]) for pid in frontends]
                        spent = [a - b for a, b in zip(after, before, strict=True)]
                        done = len(load.latencies)
                        rate[side] = done / load.wall_s
                        busy = spent if side == "all" else spent[:1]
                        fe_ms[side] = 1000 * sum(busy) / done
                        if side == "one" and count > 1:  # the idle processes' CPU share
                            idle = 100 * sum(spent[1:]) / (count - 1) / load.wall_s
                        if side == "all":  # what set the all side's pace
                            fe_busy = sum(spent) / count / load.wall_s
                    ratio = rate["all"] / rate["one"]
                    ratios.append(ratio)
                    busy_all.append(fe_busy)
                    bound = "frontends" if fe_busy >= SATURATED else "stack"
                    print(f"  {kind:<22} {index:>5} {rate['one']:10.0f} {rate['all']:10.0f} "
                          f"{ratio:6.2f} {fe_ms['one']:10.3f} {fe_ms['all']:10.3f} "
                          f"{idle:10.1f} {fe_busy:12.2f}  {bound}")  # fmt: skip
                summary.append(scale_ab_verdict(kind, router, count, ratios, busy_all))
        finally:
            await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)
    print(f"frontend_scale_ab n={count} " + " ".join(summary))


def scale_ab_verdict(
    kind: str, router: str, count: int, ratios: list[float], busy_all: list[float]
) -> str:
    """Print the goal's verdict for one scenario from its rounds' ratios and all sides' mean
    frontend busy shares; return its summary field. Only rounds whose all side kept the
    loaded frontends SATURATED measure their scale-out: below it the clients, workers and
    NATS on the other CPUs set the pace (the frontends had CPU to spare), and the ratio is a
    floor of what the frontends would reach."""
    field = f"{router}_{kind.split()[0].replace('-', '_')}"
    bound_by_frontends = [r for r, busy in zip(ratios, busy_all, strict=True) if busy >= SATURATED]
    goal = 0.8 * count
    median = statistics.median(ratios)
    if bound_by_frontends:
        bound = statistics.median(bound_by_frontends)
        met = "met" if bound >= goal else "not met"
        print(f"  {kind:<22} median x{median:.2f}; of the {len(bound_by_frontends)} rounds "
              f"bound by the frontends x{bound:.2f} (goal >= {goal:.1f}: {met})")  # fmt: skip
        return f"{field}={bound:.2f}"
    print(f"  {kind:<22} median x{median:.2f}: no round bound by the frontends (mean busy "
          f"{statistics.median(busy_all):.2f} < {SATURATED}): the rest of the stack set "
          f"the pace, so x{median:.2f} is a floor (goal >= {goal:.1f}: not measurable "
          "here)")  # fmt: skip
    return f"{field}>={median:.2f}(stack-bound)"


async def sweep_row(
    args: argparse.Namespace, plan: tuple | None, router: str, count: int, run: int
) -> list[SweepRow]:
    """One deployment of `count` frontend processes measured; its tables printed."""
    per_process = count if args.concurrency_per_process else 1
    concurrency = args.concurrency * per_process
    requests = args.requests * per_process  # each process's run as long as at N=1
    layout = None
    if plan is not None:
        cores, rest_min, whole, _ = plan
        layout = plan_pinning(cores, count, rest_min, whole)
    load = f"{os.getloadavg()[0]:.1f}"
    results, _ = await run_hpcserve(requests, count, args.speedup, False,
                                    args.client_processes, router, concurrency, layout,
                                    SCENARIOS[:2] if args.skip_c1 else SCENARIOS,
                                    args.client)  # fmt: skip
    workers = hpcserve_config(count, args.speedup, router).workers[0].count
    where = f"{os.cpu_count()} CPUs, load average {load} before, {workers} simulated workers, "
    where += f"{args.client_processes} {args.client} client process(es)"
    if layout is not None:
        where += f"; pinned: {layout.describe()}"
    table(f"hpcserve frontend.workers={count} pass {run} (router {router}, {where})", results)
    cores_table(results, layout)
    rows = []
    for r in results:
        if r.scenario.concurrency == 1:
            continue
        bound = what_bounds(r, layout)
        print(f"  {r.scenario.name}: bound by {bound}")
        kind = r.scenario.name.split(" c=")[0]  # the same scenario at every width's load
        rows.append(SweepRow(router, count, run, kind, r.req_s, r.frontend_ms_per_req,
                             bound, work_counts(r)))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1500, help="per c=64 scenario")
    parser.add_argument("--speedup", type=float, default=1000.0, help="engine.mocker.speedup")
    parser.add_argument("--frontend-workers", type=int, default=1)
    parser.add_argument(
        "--router", choices=sorted(DYNAMO_ROUTER), default="kv",
        help="the router of both stacks (Dynamo: --router-mode kv / round-robin)",
    )  # fmt: skip
    parser.add_argument("--dynamo-venv", default="/work/dynvenv")
    parser.add_argument("--skip-dynamo", action="store_true")
    parser.add_argument("--workers-sweep", action="store_true")
    parser.add_argument("--sweep", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--client-processes", type=int, default=1,
        help="load client processes in --workers-sweep (4 on 16 cores)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=int, default=64,
        help="requests in flight in the c=64 scenarios of --workers-sweep",
    )  # fmt: skip
    parser.add_argument(
        "--skip-c1", action="store_true",
        help="--workers-sweep: leave out the c=1 scenario (its rate says nothing of scale-out)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency-per-process", action="store_true",
        help="--workers-sweep: --concurrency and --requests per frontend process (the same "
        "load on each, runs as long at every width)",
    )  # fmt: skip
    parser.add_argument(
        "--routers", nargs="+", choices=sorted(DYNAMO_ROUTER), default=None,
        help="--workers-sweep: these routers, alternated within the sweep (default: --router)",
    )  # fmt: skip
    parser.add_argument(
        "--passes", type=int, default=1,
        help="--workers-sweep: times over the widths, up then down (ratios within a pass)",
    )  # fmt: skip
    parser.add_argument(
        "--client", choices=CLIENTS, default="raw",
        help="--workers-sweep: the load client (raw: benchmarks/http_load.py, ~5x cheaper "
        "per request than aiohttp; balanced: the same with each client process's connections "
        "spread evenly over the frontend processes)",
    )  # fmt: skip
    parser.add_argument(
        "--new-prompts", type=int, default=None, metavar="REPEAT",
        help="--workers-sweep (raw/balanced clients): a new prompt each request, a number "
        "then the question REPEAT times (40: ~600 tokens), so the workers' KV events carry "
        "every prompt's blocks to every frontend process (the default question is cached)",
    )  # fmt: skip
    parser.add_argument(
        "--sim-workers", type=int, default=None,
        help="--workers-sweep: simulated workers (workers.0.count; the config's 8 cost ~1.8x "
        "the CPU per request of 4), one a process unless --sim-per-process",
    )  # fmt: skip
    parser.add_argument(
        "--sim-per-process", type=int, default=1,
        help="--sim-workers: simulated workers one process hosts (workers.0.per_process; the "
        "sweeps before it had one a process: the stack spread over the CPUs left)",
    )  # fmt: skip
    parser.add_argument(
        "--pin", action="store_true",
        help="--workers-sweep, --scale-ab (Linux): each frontend process on CPUs of its own, "
        "all else on the rest (layout printed)",
    )  # fmt: skip
    parser.add_argument(
        "--pin-rest-min", type=int, default=None,
        help="--pin: CPUs the clients, workers, NATS and etcd keep at least (default: half)",
    )  # fmt: skip
    parser.add_argument(
        "--ab-tree", default=None,
        help="c=1 A/B: another checkout whose frontend runs beside this one's (alternated)",
    )  # fmt: skip
    parser.add_argument(
        "--ab-set", action="append", default=[], metavar="KEY=VALUE",
        help="--ab-tree: a config override for its frontend only (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--scale-ab", type=int, default=None, metavar="N",
        help="N frontend processes in one deployment: one process loaded against all N, "
        "alternated --ab-rounds times (req/s ratio per round; with --pin, --routers, "
        "--concurrency per loaded process, --requests per loaded process, --client-processes)",
    )  # fmt: skip
    parser.add_argument(
        "--spin-idle", action="store_true",
        help="--scale-ab (Linux): a SCHED_IDLE spinner on every CPU, so both sides run with all "
        "CPUs busy (where CPUs slow each other down, --pin's probe above 1, one loaded "
        "process otherwise runs on a faster machine than all N)",
    )  # fmt: skip
    parser.add_argument("--ab-rounds", type=int, default=6, help="--ab-tree / --scale-ab: rounds")
    parser.add_argument("--ab-block", type=int, default=200, help="--ab-tree: requests a block")
    parser.add_argument(
        "--ab-new-prompts", action="store_true",
        help="--ab-tree: a new (numbered) question each request instead of one repeated",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="a config override of the hpcserve stack (repeatable): frontend.busy_poll_us=2000",
    )  # fmt: skip
    args = parser.parse_args()
    if args.spin_idle and not (args.scale_ab and sys.platform == "linux"):
        parser.error("--spin-idle: only with --scale-ab, on Linux")
    pins = args.workers_sweep or args.scale_ab
    if args.pin and not (pins and hasattr(os, "sched_setaffinity")):
        parser.error("--pin: only with --workers-sweep or --scale-ab, on Linux "
                     "(os.sched_setaffinity)")  # fmt: skip
    if args.new_prompts is not None:
        if not (args.workers_sweep and args.client != "aiohttp") or args.new_prompts < 1:
            parser.error("--new-prompts: a repeat >= 1, with --workers-sweep and a raw client")
        NEW_PROMPTS.append(args.new_prompts)
    EXTRA_SETTINGS.extend(args.settings)
    if args.sim_workers is not None:
        EXTRA_SETTINGS.append(f"workers.0.count={args.sim_workers}")
        EXTRA_SETTINGS.append(f"workers.0.per_process={args.sim_per_process}")
    if args.ab_tree:
        asyncio.run(c1_ab(args))
        return
    if args.scale_ab:
        with idle_spinners(args.spin_idle):
            asyncio.run(scale_ab(args))
        return
    asyncio.run(sweep(args) if args.workers_sweep else compare(args))


if __name__ == "__main__":
    main()

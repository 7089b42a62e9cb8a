"""The simulated worker's CPU per request at real-time pace, this tree's against another's.

`bench_frontend.py --speedup 1` measures the mocker workers behind a frontend, whose pace
(a starved frontend keeps fewer requests in each worker's batch) moves the workers' CPU per
request as much as their code does. This script takes the frontend out: it starts one
deployment of `configs/local-mocker-kv.yaml` (real etcd, NATS, `--workers` mocker workers of
this tree, `engine.mocker.speedup` = `--speedup`) and, with `--ab-tree`, as many workers run
from another checkout (B: the code before a change) joining it; then it drives each side's
workers straight over NATS as the frontend does (`batch_replies`), `--in-flight` requests per
worker, each a fresh prompt and `--max-tokens` tokens, in alternated rounds (A, B, A, B...).
Per round and side it prints req/s and the workers' user+system CPU (/proc) per request;
with B, last `mocker_worker_ab a_ms_per_req=... b_ms_per_req=... b_over_a=...` (medians of
the rounds, and of the per-round ratios).

    python benchmarks/bench_mocker_worker.py [--ab-tree /path/to/old] [--rounds 4] \
        [--requests 800] [--workers 4] [--in-flight 8] [--max-tokens 32] [--speedup 1]

`--per-process K` hosts side A's workers K to a process (`workers.N.per_process`, default 1);
`--ab-per-process K2` adds side B to the same deployment: as many workers of this tree,
K2 to a process (a second worker group, ids agg-g1-iN), e.g. one process per worker against
the mocker's default four:

    python benchmarks/bench_mocker_worker.py --workers 8 --per-process 1 --ab-per-process 4

`--engine-only` measures the mocker engine alone, without NATS or a worker: per round and
side a fresh process (run from the side's tree) drives `--engines` MockerEngines on one
uvloop loop, `--in-flight` requests each, and reports its CPU per request. B is `--ab-tree`'s
engine, or this tree's with `--ab-engines` engines per process (several simulated workers
sharing one process, as Dynamo's `--num-workers`). Last line `mocker_engine_ab ...`.

    python benchmarks/bench_mocker_worker.py --engine-only --ab-tree /path/to/old [--rounds 8]
    python benchmarks/bench_mocker_worker.py --engine-only --ab-engines 4 [--engines 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_frontend import cpu_seconds

from contract import bus
from contract.config import DeploymentConfig, load_config
from hpcserve.launcher import start_deployment, stop_deployment

REPO = Path(__file__).resolve().parents[1]


class Driver:
    """One NATS connection that sends requests to workers and counts their finishes."""

    def __init__(self, nc, max_tokens: int, prompt_tokens: int) -> None:  # type: ignore[no-untyped-def]
        self.nc = nc
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.inbox = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.rng = random.Random(14)

    async def start(self) -> None:
        await self.nc.subscribe(f"{self.inbox}.>", cb=self._on_reply)

    async def _on_reply(self, msg) -> None:  # type: ignore[no-untyped-def]
        if not msg.data:  # a status message (no responders yet: `wait_ready` polls)
            return
        data = orjson.loads(msg.data)
        for chunk in data if isinstance(data, list) else [data]:
            if "finish_reason" in chunk:
                future = self.waiting.pop(chunk["request_id"], None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def one(self, subject: str, max_tokens: int | None = None) -> None:
        request_id = uuid.uuid4().hex
        # only fields every tree's GenerateRequest has (the others take their defaults)
        request = {
            "request_id": request_id,
            "token_ids": [self.rng.randrange(100, 30000) for _ in range(self.prompt_tokens)],
            "sampling": {"max_tokens": max_tokens or self.max_tokens, "ignore_eos": True},
            "batch_replies": True,
        }
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        await self.nc.publish(subject, orjson.dumps(request), reply=f"{self.inbox}.{request_id}")
        await future

    async def round(self, subjects: list[str], in_flight: int, requests: int) -> float:
        """`requests` requests over `subjects`, `in_flight` at a time on each; seconds taken."""
        left = [requests]

        async def lane(subject: str) -> None:
            while left[0] > 0:
                left[0] -= 1
                await self.one(subject)

        start = time.perf_counter()
        await asyncio.gather(*(lane(s) for s in subjects for _ in range(in_flight)))
        return time.perf_counter() - start

    async def wait_ready(self, subject: str, timeout_s: float = 120) -> None:
        """Until the worker on `subject` answers a one-token request (polled)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await asyncio.wait_for(self.one(subject, max_tokens=1), 1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no worker answers on {subject}") from None


_ENGINE_RUN = """
import asyncio, random, sys, time
import uvloop
from contract.config import MockerConfig
from contract.messages import GenerateRequest, SamplingParams
from mpi_workers.engine.mocker import MockerEngine
engines_n, in_flight, requests, max_tokens, prompt_tokens, speedup = map(float, sys.argv[1:7])

async def main():
    engines = [MockerEngine(MockerConfig(speedup=speedup), num_blocks=8192)
               for _ in range(int(engines_n))]
    for engine in engines:
        await engine.start()
    rng, sent = random.Random(14), [0]

    async def lane(engine):
        while sent[0] < requests:
            sent[0] += 1
            request = GenerateRequest(
                request_id=f"r{sent[0]}",
                token_ids=[rng.randrange(100, 30000) for _ in range(int(prompt_tokens))],
                sampling=SamplingParams(max_tokens=int(max_tokens), ignore_eos=True))
            done = asyncio.get_running_loop().create_future()

            def on_chunk(chunk):  # as the worker listens: the engine's chunks, no model
                if chunk.finish_reason is not None and not done.done():
                    done.set_result(None)
            stream = engine.generate(request)  # kept: a dropped stream aborts its request
            stream.listen_chunks(on_chunk)
            await done

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane(e) for e in engines for _ in range(int(in_flight))))
    print(1000 * (time.process_time() - cpu) / requests, requests / (time.perf_counter() - wall))
    for engine in engines:
        await engine.shutdown()

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""


def engine_round(tree: Path, engines: int, args: argparse.Namespace) -> tuple[float, float]:
    """(CPU ms per request, req/s) of `engines` MockerEngines of `tree` in a fresh process."""
    requests = args.requests * engines
    argv = [sys.executable, "-c", _ENGINE_RUN, str(engines), str(args.in_flight),
            str(requests), str(args.max_tokens), str(args.prompt_tokens), str(args.speedup)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=True)
    ms, rate = out.stdout.split()
    return float(ms), float(rate)


def engine_only(args: argparse.Namespace) -> None:
    b_tree = Path(args.ab_tree).resolve() if args.ab_tree else REPO
    sides = {"A": (REPO, args.engines), "B": (b_tree, args.ab_engines or args.engines)}
    print(f"engine only: A {REPO} x{sides['A'][1]} engines, B {b_tree} x{sides['B'][1]} "
          f"engines per process, {args.in_flight} in flight each, {args.max_tokens} tokens, "
          f"speedup {args.speedup:g}, {args.requests} requests per engine a round")  # fmt: skip
    ratios = []
    per_req: dict[str, list[float]] = {"A": [], "B": []}
    for number in range(1, args.rounds + 1):
        line = [f"round {number}"]
        for side, (tree, engines) in sides.items():
            ms, rate = engine_round(tree, engines, args)
            per_req[side].append(ms)
            line.append(f"{side}: {rate:6.0f} req/s {ms:6.3f} ms CPU/req")
        ratios.append(per_req["B"][-1] / per_req["A"][-1])
        load = Path("/proc/loadavg").read_text().split()[0]
        print("  ".join(line) + f"  B/A x{ratios[-1]:.2f}  load {load}", flush=True)
    print(f"mocker_engine_ab a_ms_per_req={statistics.median(per_req['A']):.3f} "
          f"b_ms_per_req={statistics.median(per_req['B']):.3f} "
          f"b_over_a={statistics.median(ratios):.2f}")  # fmt: skip


def start_b_workers(tree: Path, config_file: Path, count: int, log_dir: Path):
    """`count` workers run from `tree`, joining the deployment of `config_file`."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    procs = []
    for index in range(count):
        argv = [sys.executable, "-m", "mpi_workers", "--config", str(config_file), "--group",
                "0", "--index", str(index), "--worker-id", f"agg-b-i{index}"]  # fmt: skip
        with (log_dir / f"worker-b{index}.log").open("w") as out:
            procs.append(subprocess.Popen(argv, cwd=tree, env=env, stdout=out,
                                          stderr=subprocess.STDOUT))  # fmt: skip
    return procs


async def main_async(args: argparse.Namespace) -> None:
    import nats

    config = load_config(
        REPO / "configs" / "local-mocker-kv.yaml",
        ["frontend.port=0", f"engine.mocker.speedup={args.speedup}",
         f"workers.0.count={args.workers}", f"workers.0.per_process={args.per_process}"],
    )  # fmt: skip
    if args.ab_per_process is not None:  # side B: a second group, hosted K2 to a process
        data = config.model_dump(mode="json")
        data["workers"].append({**data["workers"][0], "per_process": args.ab_per_process})
        config = DeploymentConfig.model_validate(data)
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    b_procs: list[subprocess.Popen[bytes]] = []
    try:
        name = deployment.config.name

        def group_side(group: int) -> tuple[list[str], list[int]]:
            subjects = [bus.worker_subject(name, f"agg-g{group}-i{i}") for i in range(args.workers)]
            return subjects, [m.pid for p, m in deployment.processes if p.group == group]

        sides = {"A": group_side(0)}
        if args.ab_per_process is not None:
            sides["B"] = group_side(1)
        elif args.ab_tree:
            b_procs = start_b_workers(Path(args.ab_tree).resolve(), deployment.config_file,
                                      args.workers, deployment.run_dir)  # fmt: skip
            sides["B"] = ([bus.worker_subject(name, f"agg-b-i{i}") for i in range(args.workers)],
                          [p.pid for p in b_procs])  # fmt: skip
        nc = await nats.connect(deployment.config.services.nats.endpoint)
        driver = Driver(nc, args.max_tokens, args.prompt_tokens)
        await driver.start()
        for subjects, _ in sides.values():
            for subject in subjects:
                await driver.wait_ready(subject)
        for subjects, _ in sides.values():  # warm-up
            await driver.round(subjects, args.in_flight, args.requests // 4)
        hosting = {side: f"{len(pids)} process(es)" for side, (_, pids) in sides.items()}
        print(f"worker processes: {hosting}")
        print(f"{args.workers} workers a side, {args.in_flight} in flight each, "
              f"{args.max_tokens} tokens, speedup {args.speedup:g}, {args.requests} requests "
              "a round")  # fmt: skip
        per_req: dict[str, list[float]] = {side: [] for side in sides}
        for number in range(1, args.rounds + 1):
            line = [f"round {number}"]
            order = list(sides.items())
            if number % 2 == 0:  # B first every other round: neither side always goes first
                order.reverse()
            for side, (subjects, pids) in order:
                cpu0 = cpu_seconds(pids)
                seconds = await driver.round(subjects, args.in_flight, args.requests)
                ms = 1000 * (cpu_seconds(pids) - cpu0) / args.requests
                per_req[side].append(ms)
                line.append(f"{side}: {args.requests / seconds:6.0f} req/s {ms:6.3f} ms CPU/req")
            if "B" in sides:
                line.append(f"B/A x{per_req['B'][-1] / per_req['A'][-1]:.2f}")
            load = Path("/proc/loadavg").read_text().split()[0]
            print("  ".join(line) + f"  load {load}", flush=True)
        await nc.close()
        a = statistics.median(per_req["A"])
        if "B" in sides:
            b = statistics.median(per_req["B"])
            ratios = [y / x for x, y in zip(per_req["A"], per_req["B"], strict=True)]
            print(f"mocker_worker_ab a_ms_per_req={a:.3f} b_ms_per_req={b:.3f} "
                  f"b_over_a={statistics.median(ratios):.2f}")  # fmt: skip
        else:
            print(f"mocker_worker a_ms_per_req={a:.3f}")
    finally:
        for proc in b_procs:
            proc.terminate()
        for proc in b_procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ab-tree", default=None, help="another checkout's workers (B)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=800, help="per round and side")
    parser.add_argument("--workers", type=int, default=4, help="per side")
    parser.add_argument("--in-flight", type=int, default=8, help="per worker")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--speedup", type=float, default=1.0, help="engine.mocker.speedup")
    parser.add_argument("--per-process", type=int, default=1, help="A's workers per process")
    parser.add_argument("--ab-per-process", type=int, default=None,
                        help="side B: as many workers of this tree, this many per process")
    parser.add_argument("--engine-only", action="store_true", help="the engine alone (no NATS)")
    parser.add_argument("--engines", type=int, default=1, help="--engine-only: per process (A)")
    parser.add_argument("--ab-engines", type=int, default=None, help="--engine-only: B's")
    args = parser.parse_args()
    if args.engine_only:
        engine_only(args)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

"""How evenly a router spreads a burst of simultaneous requests over idle workers, by the
number of frontend processes (`frontend.workers`).

For each policy (`round_robin`, `kv`, ...; `@N`: N frontend processes, as in bench_router):
a local deployment of `configs/local-mocker-kv.yaml` with `--workers` simulated workers, then
`--bursts` times: `--burst` streaming requests sent at once (each on its own connection, so
the kernel spreads them over the processes), held open until every one has its first chunk
and the workers' own load reports (`LoadMetrics` on NATS, what each worker really runs) add
up to the burst; then all closed, and the next burst once the workers are idle again.

A burst of 2 x 8 requests on 8 workers placed as one rotation puts 2 on each; `excess` is
the requests beyond that even share (sum over workers of max(0, count - burst / workers)):
0 for one exact rotation, ~5.5 for independent uniform choices of 16 over 8.

    python benchmarks/bench_burst_spread.py --policies 'round_robin@7;round_robin@1;kv@7;kv@1'

Last line: `burst_spread <policy>=<mean excess> ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.bus import connect, load_metrics_subject
from contract.config import load_config
from contract.messages import LoadMetrics

logger = logging.getLogger("bench_burst_spread")
REPO = Path(__file__).resolve().parents[1]


def overrides_of(policy: str) -> list[str]:
    """`kv@7` -> frontend.router=kv, frontend.workers=7."""
    router, _, processes = policy.partition("@")
    sets = [f"frontend.router={router}"]
    if processes:
        sets.append(f"frontend.workers={int(processes)}")
    return sets


async def until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout_s:.0f} s")
        await asyncio.sleep(0.02)


async def run_policy(policy: str, args: argparse.Namespace) -> list[int]:
    """The excess of each burst."""
    import httpx

    from hpcserve.launcher import start_deployment, stop_deployment

    run_dir = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    sets = [
        "name=bench-burst", "frontend.port=0", f"workers.0.count={args.workers}",
        f"run_dir={run_dir}", *overrides_of(policy), *getattr(args, "set", []),
    ]  # fmt: skip
    config = load_config(REPO / "configs" / "local-mocker-kv.yaml", sets, environ={})
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    load: dict[str, LoadMetrics] = {}

    async def on_load(msg) -> None:  # type: ignore[no-untyped-def]
        report = LoadMetrics.model_validate_json(msg.data)
        load[report.worker_id] = report

    def running() -> dict[str, int]:
        return {w: m.active_sequences + m.waiting_sequences for w, m in load.items()}

    nats_url = deployment.config.services.nats.endpoint
    assert nats_url is not None  # resolved by the launcher
    nc = await connect(nats_url, "bench-burst")
    excess: list[int] = []
    try:
        await nc.subscribe(load_metrics_subject(config.name), cb=on_load)
        await until(lambda: len(load) == args.workers, 120, "every worker's load report")
        share = args.burst / args.workers
        for burst in range(args.bursts):
            async with contextlib.AsyncExitStack() as stack:

                async def open_one(k: int, burst: int = burst) -> None:
                    client = await stack.enter_async_context(httpx.AsyncClient(timeout=120))
                    body = {"prompt": [5, 6, 7, burst, k], "max_tokens": args.max_tokens,
                            "stream": True}  # fmt: skip
                    response = await stack.enter_async_context(
                        client.stream("POST", deployment.url + "/completions", json=body)
                    )
                    lines = response.aiter_lines()
                    stack.push_async_callback(lines.aclose)
                    await anext(lines)  # routed, running

                await asyncio.gather(*(open_one(k) for k in range(args.burst)))
                await until(lambda: sum(running().values()) == args.burst, 30,
                            "the workers' reports adding up to the burst")  # fmt: skip
                counts = running()
                excess.append(round(sum(max(0.0, c - share) for c in counts.values())))
                logger.info("%s burst %d: per worker %s, excess %d", policy, burst,
                            sorted(counts.values(), reverse=True), excess[-1])  # fmt: skip
            await until(lambda: sum(running().values()) == 0, 60, "idle workers")
    finally:
        await nc.close()
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)
    return excess


async def main_async(args: argparse.Namespace) -> None:
    policies = args.policies.split(";")
    found: dict[str, list[int]] = {p: [] for p in policies}
    for round_ in range(args.repeat):
        shift = round_ % len(policies)
        for policy in policies[shift:] + policies[:shift]:  # rotating order
            found[policy] += await run_policy(policy, args)
            logger.info("round %d %s: load %.2f", round_, policy, os.getloadavg()[0])
    for policy, values in found.items():
        logger.info("%-16s excess per burst of %d on %d workers: mean %.2f (%s)", policy,
                    args.burst, args.workers, statistics.fmean(values),
                    " ".join(map(str, values)))  # fmt: skip
    print("burst_spread " + " ".join(f"{p}={statistics.fmean(v):.2f}" for p, v in found.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="round_robin@7;round_robin@1;kv@7;kv@1")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--set", action="append", default=[],
                        help="extra config overrides key=value, for every policy")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

"""What every frontend process receives from the workers per request: KV event batches and load
reports, counted on a real nats-server while simulated workers serve new prompts.

Each frontend process subscribes to the whole deployment's KV events and (a load-reading router)
its workers' `LoadMetrics`, so at N processes each receives, per request it routes itself, N
times the deployment's messages per request. Here `--workers` mocker `Worker`s (real NATS and
etcd, as a deployment runs them) serve
`--requests` new prompts of `--prompt-blocks` full blocks sent over NATS to their subjects as a
frontend sends them, `--concurrency` at a time, their KV pools small enough to evict; a
subscriber counts the messages and bytes on both subjects.

    python benchmarks/count_kv_traffic.py [--workers 6] [--requests 600] [--concurrency 24]

Last line: `kv_traffic kv_msgs_per_req=... kv_bytes_per_req=... load_msgs_per_req=...
load_msgs_per_s=...` (load reports are paced in time, not per request: see the rate).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


async def count(args: argparse.Namespace, nats_url: str, etcd: str) -> None:
    from contract.bus import connect, kv_events_subject, load_metrics_subject, worker_subject
    from contract.config import MockerConfig
    from contract.messages import GenerateOutput, GenerateRequest, SamplingParams, request_json
    from mpi_workers.engine.mocker import MockerEngine, ModelShape
    from mpi_workers.worker import Worker

    deployment = f"kvtraffic-{uuid.uuid4().hex[:8]}"
    seen = {"kv": [0, 0], "load": [0, 0]}  # subject -> [messages, bytes]
    listener = await connect(nats_url, "count-kv-traffic")

    def counter(kind: str):  # type: ignore[no-untyped-def]
        async def on(msg) -> None:  # type: ignore[no-untyped-def]
            seen[kind][0] += 1
            seen[kind][1] += len(msg.data)

        return on

    await listener.subscribe(kv_events_subject(deployment), cb=counter("kv"))
    await listener.subscribe(load_metrics_subject(deployment), cb=counter("load"))
    await listener.flush()
    engines = [MockerEngine(MockerConfig(speedup=args.speedup), shape=ModelShape(vocab_size=32000),
                            num_blocks=args.num_blocks) for _ in range(args.workers)]  # fmt: skip
    workers = [Worker(engine, deployment=deployment, worker_id=f"w{i}", role="agg",
                      nats_url=nats_url, etcd_endpoint=etcd, lease_ttl_s=5, capacity=64)
               for i, engine in enumerate(engines)]  # fmt: skip
    for worker in workers:
        await worker.start()
    block = engines[0].block_size
    done: dict[str, asyncio.Future[None]] = {}

    async def on_reply(msg) -> None:  # type: ignore[no-untyped-def]
        chunk = GenerateOutput.model_validate_json(msg.data)
        if chunk.finish_reason is not None and chunk.request_id in done:
            done[chunk.request_id].set_result(None)

    await listener.subscribe("count-kv-traffic.replies.*", cb=on_reply)

    async def one(n: int) -> None:
        prompt = [(n * 7919 + t) % 31000 + 3 for t in range(args.prompt_blocks * block + 5)]
        request = GenerateRequest(request_id=f"r{n}", token_ids=prompt,
                                  sampling=SamplingParams(max_tokens=args.max_tokens,
                                                          ignore_eos=True))  # fmt: skip
        finished = done[request.request_id] = asyncio.get_running_loop().create_future()
        await listener.publish(worker_subject(deployment, f"w{n % len(engines)}"),
                               request_json(request),
                               reply=f"count-kv-traffic.replies.{request.request_id}")  # fmt: skip
        await finished
        del done[request.request_id]

    try:
        deadline = time.monotonic() + 10
        while seen["load"][0] < len(workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polled: the workers' first load reports, then count
        before = {kind: list(values) for kind, values in seen.items()}
        start = time.monotonic()
        for first in range(0, args.requests, args.concurrency):
            await asyncio.gather(*(one(n) for n in range(first, min(first + args.concurrency,
                                                                      args.requests))))  # fmt: skip
        took = time.monotonic() - start
        await asyncio.sleep(0.2)  # the last batches
        await listener.flush()
    finally:
        for worker in workers:
            await worker.stop()
        await listener.close()
    n = args.requests
    kv_msgs, kv_bytes = (seen["kv"][i] - before["kv"][i] for i in range(2))
    load_msgs = seen["load"][0] - before["load"][0]
    print(f"{n} requests of {args.prompt_blocks} blocks, {args.workers} workers, {took:.2f} s "
          f"({n / took:.0f} req/s): KV batches {kv_msgs} ({kv_msgs / n:.2f} a request, "
          f"{kv_bytes / n / 1024:.2f} KiB), load reports {load_msgs} ({load_msgs / n:.2f} a "
          f"request, {load_msgs / took:.0f} a second)")  # fmt: skip
    print(f"kv_traffic kv_msgs_per_req={kv_msgs / n:.3f} kv_bytes_per_req={kv_bytes / n:.0f} "
          f"load_msgs_per_req={load_msgs / n:.3f} load_msgs_per_s={load_msgs / took:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--prompt-blocks", type=int, default=37)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=2048, help="each worker's KV pool")
    parser.add_argument("--speedup", type=float, default=100.0, help="mocker speedup")
    args = parser.parse_args()
    from real_services import start_etcd, start_nats

    with tempfile.TemporaryDirectory(prefix="count-kv-traffic-") as tmp:
        nats, url = start_nats(Path(tmp))
        etcd, endpoint = start_etcd(Path(tmp))
        try:
            asyncio.run(count(args, url, endpoint))
        finally:
            nats.stop()
            etcd.stop()


if __name__ == "__main__":
    main()

"""What the load traffic of a multi-process deployment costs one frontend process's CPU.

With `frontend.workers: N` every frontend process hears its N - 1 peers' in-flight counts
(`frontend.load_share`, up to one message per peer every 2 ms under load) and every worker's
`LoadMetrics` (up to 20 a second each); a router that reads load needs both, round robin and
random read neither (`contract.config.LOAD_READING_ROUTERS`). Here one process's NATS side
listens as a load-reading router's does ("reads": LoadShare + the workers' load reports) or as round
robin's does ("blind"), alternated, while a child process publishes the traffic of N - 1
busy peers and 8 workers at their real rates; the listener's CPU over the window is what
that traffic costs it (the listener does nothing else).

    python benchmarks/bench_load_traffic.py [--processes 6] [--seconds 3] [--rounds 4]

Last line: `load_traffic processes=N reads_cores=... blind_cores=... us_per_message=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from contract.bus import connect, frontend_load_subject, load_metrics_subject
from contract.messages import LoadMetrics
from frontend.load_share import FLUSH_S, LoadShare, encode_load
from frontend.router import LoadTracker
from frontend.worker_client import WorkerClient

WORKERS = 8
REPORT_S = 0.05  # a busy worker's load report interval (mpi_workers.worker.METRICS_POLL_S)


async def publish_traffic(url: str, deployment: str, peers: int, seconds: float) -> int:
    """N - 1 peers' counts every FLUSH_S and 8 workers' reports every REPORT_S; messages sent."""
    nc = await connect(url, "load-traffic-peers")
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent, seq, next_report = 0, 0, start
    while loop.time() - start < seconds:
        seq += 1
        for peer in range(peers):
            counts = {f"w{w}": ((seq + w + peer) % 7, (seq * 3 + w) % 50) for w in range(WORKERS)}
            await nc.publish(
                frontend_load_subject(deployment), encode_load(f"p{peer}", seq, counts)
            )
            sent += 1
        if loop.time() >= next_report:
            next_report += REPORT_S
            for w in range(WORKERS):
                report = LoadMetrics(worker_id=f"w{w}", active_sequences=seq % 9, free_blocks=100)
                await nc.publish(
                    load_metrics_subject(deployment), report.model_dump_json().encode()
                )
                sent += 1
        await asyncio.sleep(FLUSH_S)
    await nc.flush()
    await nc.close()
    return sent


def _publisher(url: str, deployment: str, peers: int, seconds: float, out) -> None:  # type: ignore[no-untyped-def]
    out.put(asyncio.run(publish_traffic(url, deployment, peers, seconds)))


async def listen_round(url: str, reads: bool, peers: int, seconds: float) -> tuple[float, int]:
    """Cores this process spent while the traffic ran, and the messages published."""
    deployment = f"lt{os.getpid()}{int(time.monotonic() * 1000)}"
    tracker = LoadTracker()
    client = WorkerClient(url, deployment, tracker, load_metrics=reads)
    share = LoadShare(url, deployment, tracker) if reads else None
    await client.start()
    if share is not None:
        await share.start()
    out: multiprocessing.Queue[int] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_publisher, args=(url, deployment, peers, seconds, out))
    try:
        child.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        while child.is_alive():
            await asyncio.sleep(0.05)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        sent = out.get(timeout=10)
        if share is not None and len(share.peers.peers) != peers:
            raise RuntimeError(f"heard {len(share.peers.peers)} of {peers} peers")
    finally:
        if share is not None:
            await share.stop()
        await client.stop()
    return cpu / wall, sent


async def main_async(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from real_services import start_nats  # the tests' readiness-checked nats-server

    with tempfile.TemporaryDirectory(prefix="bench-load-traffic-") as tmp:
        nats, url = start_nats(Path(tmp))
        try:
            peers = args.processes - 1
            figures: dict[str, list[float]] = {"reads": [], "blind": []}
            rates: list[float] = []
            print(f"one frontend process of {args.processes}: {peers} peers' counts every "
                  f"{FLUSH_S * 1000:g} ms, {WORKERS} workers' reports every "
                  f"{REPORT_S * 1000:g} ms")  # fmt: skip
            print(f"  {'round':<6} {'reads cores':>12} {'blind cores':>12} {'msgs/s':>8} "
                  f"{'us/msg':>8}  load average")  # fmt: skip
            for index in range(args.rounds):
                order = ("reads", "blind") if index % 2 == 0 else ("blind", "reads")
                this: dict[str, float] = {}
                for mode in order:
                    cores, sent = await listen_round(url, mode == "reads", peers, args.seconds)
                    this[mode] = cores
                    if mode == "reads":
                        rates.append(sent / args.seconds)
                for mode, cores in this.items():
                    figures[mode].append(cores)
                per_msg = 1e6 * (this["reads"] - this["blind"]) / rates[-1]
                load = Path("/proc/loadavg").read_text().split()[0]
                print(f"  {index:<6} {this['reads']:12.3f} {this['blind']:12.3f} "
                      f"{rates[-1]:8.0f} {per_msg:8.1f}  {load}")  # fmt: skip
        finally:
            nats.stop()
    reads = sorted(figures["reads"])[len(figures["reads"]) // 2]
    blind = sorted(figures["blind"])[len(figures["blind"]) // 2]
    rate = sorted(rates)[len(rates) // 2]
    print(f"load_traffic processes={args.processes} reads_cores={reads:.3f} "
          f"blind_cores={blind:.3f} msgs_per_s={rate:.0f} "
          f"us_per_message={1e6 * (reads - blind) / rate:.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=6, help="frontend.workers")
    parser.add_argument("--seconds", type=float, default=3.0, help="traffic per round")
    parser.add_argument("--rounds", type=int, default=4)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

"""What worker crashes cost under steady streaming load: requests lost, latency of the requests
a crash hit, and the time until the restarted worker serves again.

`hpcserve up` (the real supervisor, frontend, etcd, NATS) with simulated (mocker) workers;
`--concurrency` streaming chat requests of `--tokens` tokens run back to back for
`--duration` seconds while a worker is killed (SIGKILL to its process group) every
`--kill-every` seconds, round the workers. A request in flight when a kill happened is
"disturbed" (it may have been migrated); the others are the same run's baseline. The
frontend's migration counter is read from its /metrics.

    python benchmarks/bench_faults.py [--workers 4] [--duration 40] [--kill-every 8]

The last line: `faults killed=<k> requests=<n> failed=<f> migrated=<m>
restart_to_serving_s=<t>` (t: the median time from a kill to the worker's "is back").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"^hpcserve ready: (http://\S+/v1)$")
BACK = re.compile(r"(worker-\S+) is back \(restart \d+\)")


class Up:
    """`hpcserve up` in a subprocess; its output lines time-stamped as they arrive."""

    def __init__(self, args: list[str], run_dir: Path) -> None:
        self.run_dir = run_dir
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "hpcserve", "up", *args, "--set", f"run_dir={run_dir}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            match = READY.match(line.strip())
            if match:
                self.url = match.group(1)
                self.ready.set()
        self.ready.set()

    def pids(self) -> dict[str, int]:
        return json.loads((self.run_dir / "pids.json").read_text())

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)


def migrations(base_url: str) -> float:
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10).read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith("hpcserve_frontend_migrations_total") and 'outcome="migrated"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


Result = tuple[float, float, str]


async def load(url: str, args: argparse.Namespace, stop_at: float) -> list[Result]:
    """(start, end, outcome) of every request; outcome "ok" or the error."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id
    results: list[Result] = []

    async def one_stream() -> None:
        while time.monotonic() < stop_at:
            start = time.monotonic()
            try:
                stream = await client.chat.completions.create(
                    model=model, stream=True, max_tokens=args.tokens, temperature=0,
                    messages=[{"role": "user", "content": "Tell me a long story."}],
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                count, reason = 0, None
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        count += 1
                    if chunk.choices and chunk.choices[0].finish_reason:
                        reason = chunk.choices[0].finish_reason
                outcome = "ok" if reason in ("length", "stop") else f"finish {reason}"
            except Exception as exc:
                outcome = f"error: {exc!r}"[:200]
            results.append((start, time.monotonic(), outcome))

    await asyncio.gather(*(one_stream() for _ in range(args.concurrency)))
    await client.close()
    return results


def kill_loop(up: Up, args: argparse.Namespace, stop_at: float, kills: list[tuple[float, str]]):
    workers = [f"worker-agg-g0-i{i}" for i in range(args.workers)]
    turn = 0
    next_kill = time.monotonic() + args.kill_every
    while next_kill < stop_at - args.kill_every / 2:
        time.sleep(max(0.0, next_kill - time.monotonic()))
        name = workers[turn % len(workers)]
        turn += 1
        try:
            os.killpg(up.pids()[name], signal.SIGKILL)
            kills.append((time.monotonic(), name))
        except (ProcessLookupError, KeyError):
            pass  # still restarting from its last kill
        next_kill += args.kill_every


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--kill-every", type=float, default=8.0)
    parser.add_argument("--speedup", type=float, default=4.0, help="mocker timing speed-up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        up = Up(["configs/local-mocker-kv.yaml", "--set", "frontend.port=0",
                 "--set", f"workers.0.count={args.workers}",
                 "--set", "workers.0.per_process=1",  # a kill takes one worker, not four
                 "--set", f"engine.mocker.speedup={args.speedup}",
                 "--set", "workers.0.restart.max_restarts=100",
                 "--set", "workers.0.restart.backoff_s=0.5"], Path(tmp) / "run")  # fmt: skip
        try:
            up.ready.wait(300)
            if up.url is None:
                print("\n".join(line for _, line in up.lines))
                return 1
            before = migrations(up.url)
            stop_at = time.monotonic() + args.duration
            kills: list[tuple[float, str]] = []
            killer = threading.Thread(target=kill_loop, args=(up, args, stop_at, kills))
            killer.start()
            results = asyncio.run(load(up.url, args, stop_at))
            killer.join()
            migrated = migrations(up.url) - before
        finally:
            up.stop()
    failed = [r for r in results if r[2] != "ok"]
    disturbed = [end - start for start, end, _ in results
                 if any(start < t < end for t, _ in kills)]  # fmt: skip
    calm = [end - start for start, end, _ in results
            if not any(start < t < end for t, _ in kills)]  # fmt: skip
    backs = []
    for when, name in kills:
        later = [t for t, line in up.lines if t > when and (m := BACK.search(line))
                 and m.group(1) == name]  # fmt: skip
        if later:
            backs.append(later[0] - when)
    print(f"workers {args.workers}, {args.concurrency} streams of {args.tokens} tokens for "
          f"{args.duration:.0f} s, a kill every {args.kill_every:.0f} s")  # fmt: skip
    print(f"requests {len(results)}: failed {len(failed)}, in flight at a kill {len(disturbed)}")
    for outcome in sorted({r[2] for r in failed})[:5]:
        print(f"  failure: {outcome}")
    ratio = p99(disturbed) / p99(calm) if calm and disturbed else float("nan")
    print(f"latency p99: undisturbed {p99(calm):.2f} s, disturbed {p99(disturbed):.2f} s "
          f"({ratio:.2f}x); median {statistics.median(calm) if calm else float('nan'):.2f} s")
    restart = statistics.median(backs) if backs else float("nan")
    print(f"kill to serving again: median {restart:.2f} s over {len(backs)} restarts")
    print(f"faults killed={len(kills)} requests={len(results)} failed={len(failed)} "
          f"migrated={migrated:.0f} restart_to_serving_s={restart:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

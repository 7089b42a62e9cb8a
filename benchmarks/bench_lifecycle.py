"""A deployment across job generations on the 3-node namespace test cluster (needs root).

    .venv/bin/python benchmarks/bench_lifecycle.py [--requests 200]

Brings the cluster up, submits configs/slurm-mocker.yaml as a 1-minute job with
`slurm.successor` (drain_s 20, successor_lead_s 55: the successor is submitted at once) and
starts `hpcserve gateway` for it. Then:

1. gateway added latency: `--requests` small non-streamed chat completions (max_tokens 1),
   alternating direct-to-frontend and through the gateway, same client, same generation;
   p50/p99 of each, the added p50 in ms and as a ratio to the direct one;
2. a client loop through the gateway (streamed and not) across the switch to the successor
   until the first generation is FINISHED: requests failed;
3. successor_ready_s: from the successor's sbatch (its job_id file) to its READY (observed,
   polled every 0.1 s).

Last line: `lifecycle switch_failed=<n> gateway_p50_added_ms=<x> successor_ready_s=<t>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLUSTER_SH = REPO / "slurm" / "testing" / "cluster.sh"
CONFIG = REPO / "configs" / "slurm-mocker.yaml"
NAME = "bench-lifecycle"
PROMPT = [{"role": "user", "content": "Count to ten."}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_until(check, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def latency(direct: str, gateway: str, requests: int) -> tuple[list[float], list[float]]:
    import openai

    clients = {url: openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30)
               for url in (direct, gateway)}  # fmt: skip
    model = clients[direct].models.list().data[0].id
    times: dict[str, list[float]] = {direct: [], gateway: []}
    for index in range(requests + 10):
        url = (direct, gateway)[index % 2]
        t0 = time.perf_counter()
        clients[url].chat.completions.create(model=model, messages=PROMPT, max_tokens=1)
        if index >= 10:  # warm-up: connections, first-request paths
            times[url].append((time.perf_counter() - t0) * 1000)
    return times[direct], times[gateway]


def client_loop(url: str, stop: threading.Event, counts: dict[str, int],
                failures: list[str]) -> None:  # fmt: skip
    import openai

    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    while not stop.is_set():
        try:
            model = api.models.list().data[0].id
            if counts["done"] % 2:
                finish = None
                for chunk in api.chat.completions.create(
                    model=model, messages=PROMPT, max_tokens=40, stream=True,
                    extra_body={"ignore_eos": True},
                ):  # fmt: skip
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                if finish != "length":
                    raise RuntimeError(f"stream ended without its finish ({finish})")
            else:
                api.chat.completions.create(model=model, messages=PROMPT, max_tokens=8)
            counts["done"] += 1
        except Exception as exc:  # every failure is counted and shown
            failures.append(f"{type(exc).__name__}: {exc}")


def run(requests: int, model_dir: Path) -> tuple[int, float, float]:
    from contract.config import load_config
    from contract.readiness import free_port, http_ok
    from slurm.deployment import cancel_deployment, generations
    from slurm.jobs import job_status, submit
    from slurm.state import read_state

    sets = [f"model.path={model_dir}", f"name={NAME}", "slurm.time_limit=1",
            "slurm.drain_s=20", "slurm.successor=true", "slurm.successor_lead_s=55"]  # fmt: skip
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "hpcserve", "gateway", NAME, "--port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    gateway_url = f"http://127.0.0.1:{port}/v1"
    try:
        first = submit(load_config(CONFIG, sets, environ={}))
        wait_until(lambda: job_status(first.job_id).state == "READY", "the first READY", 120)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/gateway/health"), "gateway", 30)

        # The successor was submitted at once (lead 55 s > 1 minute - start-up): its READY.
        wait_until(lambda: len(generations(NAME)) >= 2, "the successor's submission", 60)
        second_id, second_dir = generations(NAME)[1]
        submitted_at = (second_dir / "job_id").stat().st_mtime
        def settled() -> bool:
            state = read_state(second_dir)
            return state is not None and state.state in ("READY", "FAILED")

        wait_until(settled, "the successor's READY", 120)
        successor_ready_s = time.time() - submitted_at
        state = read_state(second_dir)
        if state is None or state.state != "READY":
            raise RuntimeError(f"successor {second_id}: {state}")

        # The gateway now sends to the successor (the newest READY): direct to the same one.
        direct = state.url or ""
        direct_ms, gateway_ms = latency(direct, gateway_url, requests)

        stop, counts, failures = threading.Event(), {"done": 0}, []
        loop = threading.Thread(target=client_loop, args=(gateway_url, stop, counts, failures))
        loop.start()
        wait_until(lambda: job_status(first.job_id).state == "FINISHED", "the first's end", 180)
        time.sleep(2)  # a few more requests on the successor alone
        stop.set()
        loop.join(60)
        ended = read_state(first.job_dir)
    finally:
        gateway.terminate()
        gateway.wait(10)
        cancel_deployment(NAME)
    d50, g50 = statistics.median(direct_ms), statistics.median(gateway_ms)
    print(f"direct  p50 {d50:7.2f} ms  p99 {percentile(direct_ms, 0.99):7.2f} ms")
    print(f"gateway p50 {g50:7.2f} ms  p99 {percentile(gateway_ms, 0.99):7.2f} ms "
          f"(ratio to direct: p50 {g50 / d50:.2f}, "
          f"p99 {percentile(gateway_ms, 0.99) / percentile(direct_ms, 0.99):.2f})")  # fmt: skip
    print(f"first generation: {ended.state if ended else '?'} "
          f"({ended.reason if ended else '?'}); successor job {second_id} "
          f"READY {successor_ready_s:.1f} s after its sbatch")  # fmt: skip
    print(f"client loop across the switch: {counts['done']} requests, {len(failures)} failed")
    for failure in failures[:5]:
        print(f"  {failure}")
    return len(failures), g50 - d50, successor_ready_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_lifecycle: needs root (the namespace Slurm cluster)", file=sys.stderr)
        return 2
    from contract.config import default_model_dir

    model_dir = default_model_dir()
    if not (model_dir / "config.json").is_file():
        print("bench_lifecycle: run `hpcserve model prepare` first", file=sys.stderr)
        return 2
    state = tempfile.mkdtemp(prefix="bench-lifecycle-")
    os.environ["HPCSERVE_SLURM_DIR"] = f"{state}/cluster"
    os.environ["HPCSERVE_SLURM_JOBS"] = f"{state}/jobs"
    try:
        up = subprocess.run(["bash", str(CLUSTER_SH), "up", "3"], capture_output=True, text=True,
                            check=True)  # fmt: skip
        os.environ["SLURM_CONF"] = up.stdout.strip().splitlines()[-1].partition("=")[2]
        failed, added_ms, ready_s = run(args.requests, model_dir)
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], check=False, capture_output=True)
    print(f"lifecycle switch_failed={failed} gateway_p50_added_ms={added_ms:.2f} "
          f"successor_ready_s={ready_s:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

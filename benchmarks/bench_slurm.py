"""Slurm launcher timings on the 3-node namespace test cluster (needs root).

    .venv/bin/python benchmarks/bench_slurm.py [--rounds 3] [--via sbatch|submitit|both]

Brings the cluster up (slurm/testing/cluster.sh up 3), then per round: submit
configs/slurm-agg.yaml → READY (state file, polled every 0.1 s), one greedy chat completion,
cancel → the job, its steps and every process of the deployment gone. Tears the cluster down.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLUSTER_SH = REPO / "slurm" / "testing" / "cluster.sh"
CONFIG = REPO / "configs" / "slurm-agg.yaml"


def processes_of(job_dir: Path) -> int:
    """Live, non-zombie processes whose command line names the job dir."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        count += state != "Z" and str(job_dir) in cmdline
    return count


def one_round(via: str, model_dir: Path) -> tuple[float, float, float]:
    import openai

    from contract.config import load_config
    from slurm.jobs import cancel, job_status, submit, submit_with_submitit

    config = load_config(CONFIG, [f"model.path={model_dir}"], environ={})
    t0 = time.monotonic()
    job = (submit_with_submitit if via == "submitit" else submit)(config)
    while (status := job_status(job.job_id)).state != "READY":
        if status.state in ("FAILED", "FINISHED"):
            raise RuntimeError(status.describe())
        time.sleep(0.1)
    ready_s = time.monotonic() - t0
    client = openai.OpenAI(base_url=status.url, api_key="none", max_retries=0, timeout=120)
    t1 = time.monotonic()
    client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0, max_tokens=30,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )  # fmt: skip
    first_s = time.monotonic() - t1
    t2 = time.monotonic()
    cancel(job.job_id)
    while processes_of(job.job_dir):
        time.sleep(0.05)
    return ready_s, first_s, time.monotonic() - t2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--via", choices=["sbatch", "submitit", "both"], default="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_slurm: needs root (the namespace Slurm cluster)", file=sys.stderr)
        return 2
    from contract.config import default_model_dir

    model_dir = default_model_dir()
    if not (model_dir / "config.json").is_file():
        print("bench_slurm: run `hpcserve model prepare` first", file=sys.stderr)
        return 2
    state = tempfile.mkdtemp(prefix="bench-slurm-")
    os.environ["HPCSERVE_SLURM_DIR"] = f"{state}/cluster"
    os.environ["HPCSERVE_SLURM_JOBS"] = f"{state}/jobs"
    try:
        t0 = time.monotonic()
        up = subprocess.run(["bash", str(CLUSTER_SH), "up", "3"], capture_output=True, text=True,
                            check=True)  # fmt: skip
        os.environ["SLURM_CONF"] = up.stdout.strip().splitlines()[-1].partition("=")[2]
        print(f"cluster up in {time.monotonic() - t0:.1f} s")
        kinds = ["sbatch", "submitit"] if args.via == "both" else [args.via]
        print(f"{'via':9} {'round':>5} {'submit→READY s':>15} {'1st answer s':>13} "
              f"{'cancel→gone s':>14}")  # fmt: skip
        for via in kinds:
            results = []
            for round_index in range(args.rounds):
                ready_s, first_s, gone_s = one_round(via, model_dir)
                results.append((ready_s, gone_s))
                print(f"{via:9} {round_index:>5} {ready_s:>15.2f} {first_s:>13.2f} {gone_s:>14.2f}")
            print(f"{via:9} {'median':>5} {statistics.median(r for r, _ in results):>15.2f} "
                  f"{'':>13} {statistics.median(g for _, g in results):>14.2f}")  # fmt: skip
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

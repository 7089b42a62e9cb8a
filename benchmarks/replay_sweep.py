"""replay_lockstep over many seeds, hop latencies and lane counts: is a routing rule better
than round robin on no_prefix_lockstep, or only on one trace?

The lockstep closed loop is chaotic: a handful of different choices moves it between states
(each worker's two requests paired, arriving together, or spread out) that differ by 5-35 %
in mean TTFT, so one replay says little about a rule. This runs `replay_lockstep`'s replay
(simulated time, deterministic) for every seed x hop x lanes and prints, per policy against
the first, each configuration's mean and p50 TTFT ratio (> 1: faster than the first
policy), then per hop latency and over all configurations the geometric mean, the range and
how many configurations lost more than 0.5 %.

    python benchmarks/replay_sweep.py [--policies 'round_robin;kv;kv:turns_without_hits=false']
        [--seeds 0,1,2,3] [--hops 0,5,15,30] [--lanes 14,15,16]

Last line per policy: `replay_sweep <policy> mean_geo=<x> mean_min=<y> p50_geo=<z>
lost=<n>/<configs>`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_router import VOCAB
from benchmarks.replay_lockstep import run_in_simulated_time


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--policies", default="round_robin;kv", help="';'-separated; the first is the baseline")
    add("--seeds", default="0,1,2,3", help="prompts and hop jitter")
    add("--hops", default="0,5,15,30", help="model ms per message (replay_lockstep --hop-ms)")
    add("--lanes", default="14,15,16", help="clients in the closed loop")
    add("--requests", type=int, default=160)
    add("--prompt-tokens", type=int, default=3400)
    args = parser.parse_args()
    policies = args.policies.split(";")
    base, others = policies[0], policies[1:]
    # policy -> hop -> [(mean ratio, p50 ratio)]
    ratios: dict[str, dict[float, list[tuple[float, float]]]] = {
        p: defaultdict(list) for p in others
    }
    for seed in _ints(args.seeds):
        rng = random.Random(seed)
        prompts = [
            [rng.randrange(3, VOCAB) for _ in range(args.prompt_tokens + rng.randrange(40))]
            for _ in range(args.requests)
        ]
        for hop in (float(h) for h in args.hops.split(",")):
            for lanes in _ints(args.lanes):
                replay_args = argparse.Namespace(
                    workers=8, lanes=lanes, requests=args.requests,
                    prompt_tokens=args.prompt_tokens, max_tokens=16, prefill_ms_per_token=0.5,
                    num_blocks=1400, event_delay_ms=4.0, metrics_ms=100.0, hop_ms=hop,
                    seed=seed,
                )  # fmt: skip
                runs = {p: run_in_simulated_time(p, prompts, replay_args) for p in policies}
                line = f"seed {seed} hop {hop:g} lanes {lanes}:"
                for p in others:
                    mean = statistics.fmean(runs[base].ttft_ms) / statistics.fmean(runs[p].ttft_ms)
                    p50 = runs[base].p(0.5) / runs[p].p(0.5)
                    ratios[p][hop].append((mean, p50))
                    line += f"  {p} mean x{mean:.3f} p50 x{p50:.3f}"
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
    for p in others:
        every = [r for by_hop in ratios[p].values() for r in by_hop]
        for hop, rows in sorted(ratios[p].items()):
            means = [m for m, _ in rows]
            sys.stdout.write(
                f"{p} x {base}, hop {hop:g}: mean geo x{statistics.geometric_mean(means):.3f} "
                f"(x{min(means):.3f}-x{max(means):.3f})\n"
            )
        means, p50s = [m for m, _ in every], [q for _, q in every]
        lost = sum(m < 0.995 for m in means)
        sys.stdout.write(
            f"replay_sweep {p} mean_geo={statistics.geometric_mean(means):.3f} "
            f"mean_min={min(means):.3f} mean_max={max(means):.3f} "
            f"p50_geo={statistics.geometric_mean(p50s):.3f} p50_min={min(p50s):.3f} "
            f"lost={lost}/{len(means)}\n"
        )


if __name__ == "__main__":
    main()

"""Is a policy's per-round ratio against round robin outside round robin's own spread?

On a noisy machine one round says little (the lockstep loop alone moves round robin's p50 by
20 % between rounds), so bench_router runs many short rounds with the policy order rotated
and pairs each policy's round with round robin's of the same round: ratio = round robin's
TTFT / the policy's (> 1: the policy faster). A control policy that is round robin under
another name (`round_robin:`) gives the spread of round robin against itself, measured the
same way. This module turns those per-round ratios into a median, a bootstrap 95 % interval
of the median (rounds resampled), a two-sided sign test, and a verdict against the control.

    python benchmarks/round_stats.py DUMP_DIR [DUMP_DIR ...] [--control round_robin:]

reads the per-request records `bench_router.py --dump DUMP_DIR` wrote
(`{workload}-{policy}-{round}.json`) and prints one verdict line per workload and policy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RESAMPLES = 4000


@dataclass(frozen=True)
class RatioSummary:
    """Per-round ratios of one policy against round robin, summarised."""

    ratios: tuple[float, ...]
    median: float
    ci95: tuple[float, float]  # bootstrap interval of the median
    below: int  # rounds where the policy was slower than round robin (ratio < 1)
    sign_p: float  # two-sided sign test of "as often above 1 as below"


def sign_test_p(below: int, above: int) -> float:
    """Two-sided binomial p-value of `below` of `below + above` rounds under p = 1/2."""
    n = below + above
    if n == 0:
        return 1.0
    k = min(below, above)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_median_ci(
    ratios: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of the median over rounds resampled with replacement (the
    rounds are the independent units; the requests of one round are not)."""
    rng = random.Random(seed)
    n = len(ratios)
    medians = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[min(resamples - 1, int(0.975 * resamples))]


def summarise(ratios: Sequence[float]) -> RatioSummary:
    if not ratios:
        raise ValueError("summarise: no rounds")
    below = sum(r < 1.0 for r in ratios)
    above = sum(r > 1.0 for r in ratios)
    return RatioSummary(
        ratios=tuple(ratios),
        median=statistics.median(ratios),
        ci95=bootstrap_median_ci(ratios),
        below=below,
        sign_p=sign_test_p(below, above),
    )


def verdict(policy: RatioSummary, control: RatioSummary | None) -> str:
    """`worse`/`better`: the policy's interval lies wholly below/above the control's (or,
    without a control, below/above 1); else `within` the control's spread."""
    low, high = control.ci95 if control else (1.0, 1.0)
    if policy.ci95[1] < low:
        return "worse"
    if policy.ci95[0] > high:
        return "better"
    return "within"


def versus_control(policy: RatioSummary, control: RatioSummary) -> RatioSummary:
    """The policy against the control round by round (the control's TTFT / the policy's):
    both ratios share the round's round robin run, so this pairing leaves its noise out."""
    return summarise([p / c for p, c in zip(policy.ratios, control.ratios, strict=True)])


def verdict_line(
    workload: str, policy: str, summary: RatioSummary, control: RatioSummary | None, what: str
) -> str:
    """`no_prefix_lockstep kv_vs_rr p50 median=x ci95=[a,b] control=[c,d] ... verdict=...`;
    with a control, `vs_control=` is the round-by-round pairing with it."""
    ctl = f"control=[{control.ci95[0]:.3f},{control.ci95[1]:.3f}]" if control else "control=1"
    paired = ""
    if control:
        pair = versus_control(summary, control)
        paired = (
            f" control_median={control.median:.3f} vs_control={pair.median:.3f}"
            f"[{pair.ci95[0]:.3f},{pair.ci95[1]:.3f}] vs_control_sign_p={pair.sign_p:.3f}"
        )
    return (
        f"{workload} {policy}_vs_rr {what} median={summary.median:.3f} "
        f"ci95=[{summary.ci95[0]:.3f},{summary.ci95[1]:.3f}] {ctl}{paired} "
        f"rounds={len(summary.ratios)} slower_rounds={summary.below} sign_p={summary.sign_p:.3f} "
        f"verdict={verdict(summary, control)}"
    )


def verdict_lines(
    per_round: dict[str, dict[str, list[float]]], control: str, what: str
) -> list[str]:
    """`per_round[workload][policy]`: ratios against round robin, one per round (round robin
    itself left out). The control policy gets its own line too, against no control."""
    lines = []
    for workload, policies in per_round.items():
        ctl = summarise(policies[control]) if control in policies else None
        for policy, ratios in policies.items():
            if ratios:
                own = summarise(ratios)
                lines.append(verdict_line(workload, policy, own, None if policy == control
                                          else ctl, what))  # fmt: skip
    return lines


def ratios_from_dump(*folders: Path) -> tuple[dict[str, dict[str, list[float]]], ...]:
    """(p50 ratios, mean ratios) per workload and policy, from bench_router's --dump files,
    each round's run paired with round robin's of the same round (and folder: several
    commands' rounds pool)."""
    runs: dict[tuple[str, str, int], list[float]] = {}
    offset = 0
    for folder in folders:
        rounds = 0
        for path in folder.glob("*.json"):
            workload, policy, round_ = path.stem.rsplit("-", 2)
            ttfts = [r["ttft_ms"] for r in json.loads(path.read_text())]
            runs[(workload, policy, offset + int(round_))] = ttfts
            rounds = max(rounds, int(round_) + 1)
        offset += rounds
    p50s: dict[str, dict[str, list[float]]] = {}
    means: dict[str, dict[str, list[float]]] = {}
    for (workload, policy, round_), ttfts in sorted(runs.items(), key=lambda kv: kv[0][2]):
        rr = runs.get((workload, "round_robin", round_))
        if policy == "round_robin" or rr is None:
            continue
        p50s.setdefault(workload, {}).setdefault(policy, []).append(p50(rr) / p50(ttfts))
        means.setdefault(workload, {}).setdefault(policy, []).append(
            statistics.fmean(rr) / statistics.fmean(ttfts)
        )
    return p50s, means


def p50(ttfts: Sequence[float]) -> float:
    """bench_router's own p50 (HttpResult.p(0.5)): the upper middle element."""
    data = sorted(ttfts)
    return data[min(len(data) - 1, int(0.5 * len(data)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", type=Path, nargs="+", help="--dump folders; rounds pool")
    parser.add_argument("--control", default="round_robin:")
    args = parser.parse_args(argv)
    p50s, means = ratios_from_dump(*args.dump)
    for what, per_round in (("p50", p50s), ("mean", means)):
        for workload, policies in per_round.items():
            for policy, ratios in policies.items():
                sys.stdout.write(f"{workload} {policy} {what} rounds: "
                                 + " ".join(f"x{r:.2f}" for r in ratios) + "\n")  # fmt: skip
        sys.stdout.write("\n".join(verdict_lines(per_round, args.control, what)) + "\n")


if __name__ == "__main__":
    main()

"""bench_router's workloads measure what issue 14's goals name."""

from __future__ import annotations

from benchmarks.bench_router import (
    HttpResult,
    _per_round,
    http_workloads,
    parse_args,
    policy_overrides,
    working_set_blocks,
)
from contract.config import load_config
from frontend.tokenization import TextTokenizer


def test_small_cache_fits_all_caches_together_but_not_one(tokenizer: TextTokenizer) -> None:
    """The case a KV router is for: the prompts' blocks fit in the workers' caches together
    but not in one, so placing each prefix on one worker can keep it cached and spreading it
    cannot. With fewer blocks in all caches than in the prompts (700 blocks a worker until
    issue 14's third round) some prompt is evicted whatever the router does."""
    args = parse_args(["--http-requests", "160"])
    block_size = load_config(args.config, environ={}).engine.block_size
    needed = working_set_blocks(http_workloads(args)["small_cache"], tokenizer, block_size)
    per_worker = args.http_small_cache_blocks
    assert per_worker * args.workers >= 1.1 * needed  # room for the running requests too
    assert per_worker < needed / 4  # each worker must leave most prompts to the others
    assert per_worker < args.http_num_blocks  # smaller caches than system_prompts'


def test_a_policy_names_its_settings_and_frontend_processes() -> None:
    assert policy_overrides("round_robin") == ("round_robin", [])
    assert policy_overrides("kv:tie_band=0,x=1@7") == (
        "kv",
        ["frontend.kv_router.tie_band=0", "frontend.kv_router.x=1", "frontend.workers=7"],
    )
    assert policy_overrides("round_robin@1") == ("round_robin", ["frontend.workers=1"])


def test_each_round_pairs_with_round_robins_run_of_that_round() -> None:
    """`--repeat N`: the ratios round_stats summarises, round robin's TTFT / the policy's,
    one per round, in round order; round robin itself has none."""
    results = {
        "no_prefix/round_robin": HttpResult("round_robin", round_p50_ms=[100, 300],
                                            round_mean_ms=[200, 600]),
        "no_prefix/kv": HttpResult("kv", round_p50_ms=[200, 150], round_mean_ms=[100, 600]),
    }  # fmt: skip
    assert _per_round(results, "p50") == {"no_prefix": {"kv": [0.5, 2.0]}}
    assert _per_round(results, "mean") == {"no_prefix": {"kv": [2.0, 1.0]}}

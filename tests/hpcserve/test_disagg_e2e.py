"""`hpcserve up configs/local-disagg.yaml` end to end, for both strategies and both KV
transports: outputs must be token-identical to aggregated serving of the same model.

The aggregated reference is the built-in engine run in this test process on the same token
ids (greedy and seeded sampling, one at a time and 16 at once). One deployment per
(strategy, transport) — a module-scoped parametrized fixture — so four start-ups in all.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
import yaml
from up_helpers import (
    UpProcess,
    aggregated_texts,
    assert_concurrent_match_reference,
    greedy_and_seeded,
    openai_client,
    started,
)

from contract.bus import load_metrics_subject
from contract.messages import LoadMetrics
from frontend.tokenization import TextTokenizer

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "Explain why the sky is blue in one sentence. " * 3,  # > 2 blocks: multi-block transfer
    "1, 2, 3, 4,",
]
MAX_TOKENS = 24
COMBOS = [
    ("decode_first", "ucx"),
    ("prefill_first", "ucx"),
    ("decode_first", "nixl"),
    ("prefill_first", "nixl"),
]


def cases() -> list[tuple[int, dict]]:
    """16 requests: every prompt greedy and with seeded sampling."""
    return greedy_and_seeded(len(PROMPTS), 1000)


@pytest.fixture(scope="module")
def reference(model_dir: Path, tokenizer: TextTokenizer) -> dict[tuple[int, str], str]:
    """Aggregated serving's text for every case: all 16 run at once in one engine."""
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    return aggregated_texts(model_dir, tokenizer, prompt_ids, cases(), MAX_TOKENS)


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def up(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    strategy, transport = request.param
    run_dir = tmp_path_factory.mktemp(f"disagg-{strategy}-{transport}") / "run"
    with started(
        [
            "configs/local-disagg.yaml", "--set", "frontend.port=0",
            "--set", f"disaggregation.strategy={strategy}",
            "--set", f"disaggregation.kv_transfer={transport}",
        ],
        run_dir,
    ) as process:  # fmt: skip
        yield process


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: TextTokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


def test_single_requests_match_aggregated(
    up: UpProcess, reference: dict, prompt_ids: list[list[int]]
) -> None:
    client = openai_client(up)
    model = client.models.list().data[0].id
    for i, params in cases()[:6]:
        response = client.completions.create(
            model=model, prompt=prompt_ids[i], max_tokens=MAX_TOKENS, **params
        )
        assert response.choices[0].text == reference[(i, json.dumps(params))], (i, params)
    # streaming: the first token (prefill_first: from the prefill worker) and the rest arrive
    i, params = cases()[1]
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model, prompt=prompt_ids[i], max_tokens=MAX_TOKENS, stream=True,
            **params,
        )
        if chunk.choices
    ]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == reference[(i, json.dumps(params))]


def test_16_concurrent_requests_match_aggregated(
    up: UpProcess, reference: dict, prompt_ids: list[list[int]]
) -> None:
    assert_concurrent_match_reference(up, prompt_ids, cases(), reference, MAX_TOKENS)


def test_logit_bias_and_min_tokens_reach_the_decode_side(
    up: UpProcess, tokenizer: TextTokenizer, prompt_ids: list[list[int]]
) -> None:
    """The prefill worker samples the first token, the decode worker the rest: a +100 bias
    on one token gives it at every position, and min_tokens keeps EOS away from a short
    answer past its usual end, only if the decode side samples with them too."""
    client = openai_client(up)
    model = client.models.list().data[0].id
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    biased = client.completions.create(
        model=model, prompt=prompt_ids[0], max_tokens=6, temperature=0.0,
        logit_bias={str(forced): 100},
    )  # fmt: skip
    assert biased.choices[0].text == tokenizer.decode([forced] * 6)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    short = client.chat.completions.create(
        model=model, messages=question, max_tokens=40, temperature=0.0  # type: ignore[arg-type]
    )
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 16
    held = client.chat.completions.create(
        model=model, messages=question, max_tokens=40, temperature=0.0,  # type: ignore[arg-type]
        extra_body={"min_tokens": 16},
    )  # fmt: skip
    assert held.usage.completion_tokens >= 16


def test_no_blocks_leak(up: UpProcess) -> None:
    """Once idle, every worker's KV pool is entirely free again (cached blocks count as free)."""
    config = yaml.safe_load((up.run_dir / "config.yaml").read_text())
    deployment = config["name"]

    async def metrics() -> dict[str, LoadMetrics]:
        nc = await nats.connect(config["services"]["nats"]["endpoint"])
        seen: dict[str, LoadMetrics] = {}
        done = asyncio.Event()

        async def on_msg(msg) -> None:
            m = LoadMetrics.model_validate_json(msg.data)
            seen[m.worker_id] = m
            if len(seen) >= 2:
                done.set()

        await nc.subscribe(load_metrics_subject(deployment), cb=on_msg)
        await asyncio.wait_for(done.wait(), 10)
        await nc.close()
        return seen

    seen = asyncio.run(metrics())
    assert {w.split("-")[0] for w in seen} == {"prefill", "decode"}
    for worker_id, m in seen.items():
        assert m.free_blocks == m.total_blocks, (worker_id, m)
        assert m.active_sequences == 0 and m.waiting_sequences == 0


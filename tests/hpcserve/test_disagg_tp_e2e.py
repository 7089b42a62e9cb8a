"""`hpcserve up configs/local-disagg-tp3.yaml` end to end, prefill and decode of differing TP:
a TP 1 prefill worker feeding a TP 3 decode worker (3 MPI ranks, one KV head each;
decode_first over the `tcp` transport), and the reverse, TP 3 prefill -> TP 1 decode
(prefill_first over `ucx`). Outputs must be token-identical to aggregated serving of the
same model, greedy and with seeded sampling, one at a time and all at once.

The aggregated reference is the built-in engine run in this test process (TP 1) on the same
token ids, as in test_disagg_e2e.py. One deployment per direction (a module-scoped
parametrized fixture); each one's last test kills a follower rank of its TP group while idle:
the supervisor restarts the group and the next request, which waits for it, gets its answer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from up_helpers import (
    UpProcess,
    aggregated_texts,
    assert_concurrent_match_reference,
    greedy_and_seeded,
    openai_client,
    rank_pids,
    started,
)

from contract.processes import pid_alive
from frontend.tokenization import TextTokenizer

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence. " * 3,  # > 2 blocks: multi-block transfer
    "Once upon a time, in a small village,",
]
MAX_TOKENS = 20
# (test id, --set overrides, the TP group's worker, its first group command)
DEPLOYMENTS = [
    (
        "prefill1-decode3-tcp",
        ["disaggregation.kv_transfer=tcp", "disaggregation.strategy=decode_first"],
        "worker-decode-g1-i0",
        "KvScatter",
    ),
    (
        "prefill3-decode1-ucx",
        [
            "disaggregation.kv_transfer=ucx", "disaggregation.strategy=prefill_first",
            "workers.0.tp=3", "workers.1.tp=1",
        ],
        "worker-prefill-g0-i0",
        "step",
    ),
]  # fmt: skip


def cases() -> list[tuple[int, dict]]:
    """Every prompt greedy and with seeded sampling."""
    return greedy_and_seeded(len(PROMPTS), 2000)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: TextTokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(model_dir: Path, tokenizer: TextTokenizer, prompt_ids: list[list[int]]) -> dict:
    """Aggregated serving's text for every case (all at once in one TP 1 engine)."""
    return aggregated_texts(model_dir, tokenizer, prompt_ids, cases(), MAX_TOKENS)


@pytest.fixture(scope="module", params=DEPLOYMENTS, ids=lambda d: d[0])
def deployment(request: pytest.FixtureRequest) -> tuple:
    return request.param


@pytest.fixture(scope="module")
def up(deployment: tuple, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    name, overrides, _, _ = deployment
    run_dir = tmp_path_factory.mktemp(f"disagg-{name}") / "run"
    args = ["configs/local-disagg-tp3.yaml", "--set", "frontend.port=0",
            "--set", "frontend.no_worker_timeout_s=300",
            "--set", "workers.0.restart.backoff_s=0.2", "--set", "workers.1.restart.backoff_s=0.2"]
    for override in overrides:
        args += ["--set", override]
    with started(args, run_dir) as process:
        yield process


def test_one_group_has_three_ranks(up: UpProcess) -> None:
    assert sorted(rank_pids(up.run_dir)) == [0, 1, 2]  # the TP 1 worker is no MPI rank


def test_single_requests_match_aggregated(
    up: UpProcess, reference: dict, prompt_ids: list[list[int]]
) -> None:
    client = openai_client(up)
    model = client.models.list().data[0].id
    for i, params in cases()[4:8]:  # greedy and seeded; a short and a multi-block prompt
        response = client.completions.create(
            model=model, prompt=prompt_ids[i], max_tokens=MAX_TOKENS, **params
        )
        assert response.choices[0].text == reference[(i, json.dumps(params))], (i, params)


def test_concurrent_requests_match_aggregated(
    up: UpProcess, reference: dict, prompt_ids: list[list[int]]
) -> None:
    assert_concurrent_match_reference(up, prompt_ids, cases(), reference, MAX_TOKENS)


def test_dead_follower_restarts_the_group_and_the_request_survives(
    up: UpProcess, deployment: tuple, prompt_ids: list[list[int]], reference: dict
) -> None:
    """A follower killed while idle is noticed at the TP group's next collective (TP 3
    decode: the KV scatter; TP 3 prefill: the prefill step). The group deregisters and exits
    non-zero without answering; the supervisor starts it again; the request waits for a
    worker of its role (frontend.no_worker_timeout_s) and gets the aggregated answer."""
    _, _, worker, first_command = deployment
    ranks = rank_pids(up.run_dir)
    restart = up.next_restart(worker)
    os.kill(ranks[2], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid_alive(ranks[2]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = openai_client(up, timeout=300)
    model = client.models.list().data[0].id
    i, params = cases()[0]
    response = client.completions.create(
        model=model, prompt=prompt_ids[i], max_tokens=MAX_TOKENS, **params
    )
    assert response.choices[0].text == reference[(i, json.dumps(params))]
    up.wait_for_line(re.compile(rf"{worker} exited with code \S+; restart {restart} of"), 60)
    up.wait_back(worker, restart, 300)
    assert up.popen.poll() is None
    log = (up.run_dir / "logs" / f"{worker}.log").read_text()
    assert f"tensor-parallel {first_command} failed" in log and "deregistered" in log
    assert [pid for pid in ranks.values() if pid_alive(pid)] == []
    assert sorted(rank_pids(up.run_dir)) == [0, 1, 2]  # the new group

"""`hpcserve up configs/local-tp3.yaml`: SmolLM2 served by 3 MPI ranks (CPU, gloo), end to end.

The official openai client asks the question; the answer must name Paris and be token for
token what the TP=1 engine generates. Then a follower rank is SIGKILLed mid-stream: the
group exits non-zero after deregistering, the supervisor starts it again, and the stream
continues on it (migration) to the very tokens TP=1 generates — all bounded by timeouts.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from mpich_shm import mpich_segments
from up_helpers import (
    UpProcess,
    openai_client,
    processes_mentioning,
    rank_pids,
    started,
)

from contract.processes import pid_alive

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SHM = Path("/dev/shm")
PROMPT_IDS = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    run_dir = tmp_path_factory.mktemp("up-tp") / "run"
    args = ["configs/local-tp3.yaml", "--set", "frontend.port=0", "--set",
            "frontend.no_worker_timeout_s=300", "--set", "workers.0.restart.backoff_s=0.2"]
    with started(args, run_dir) as process:
        yield process


@pytest.fixture(scope="module")
def client(up: UpProcess) -> openai.OpenAI:
    return openai_client(up)


def tp1_tokens(model_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    from contract.messages import GenerateRequest, SamplingParams
    from mpi_workers.engine.torch.engine import TorchEngine

    async def run() -> list[int]:
        engine = TorchEngine(model_dir, num_blocks=64)
        await engine.start()
        try:
            sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            out = await engine.generate_all(GenerateRequest(
                request_id="tp1", token_ids=prompt, sampling=sampling))  # fmt: skip
            return out.token_ids
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def test_three_ranks_run(up: UpProcess) -> None:
    assert sorted(rank_pids(up.run_dir)) == [0, 1, 2]
    assert up.pids()["worker-agg-g0-i0"] > 0


def test_chat_names_paris(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=30
    )
    assert "Paris" in response.choices[0].message.content


def test_tokens_equal_tp1(client: openai.OpenAI, model_dir: Path) -> None:
    from tokenizers import Tokenizer

    model = client.models.list().data[0].id
    response = client.completions.create(
        model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=24,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    expected = tp1_tokens(model_dir, PROMPT_IDS, 24)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert response.usage.completion_tokens == 24
    assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_follower_killed_mid_stream_and_the_stream_goes_on(
    up: UpProcess, client: openai.OpenAI, model_dir: Path
) -> None:
    """A follower rank SIGKILLed while a greedy stream decodes: the group fails, withholds
    its error reply, deregisters and exits non-zero; the supervisor starts a new group; the
    frontend migrates the stream (prompt + tokens so far) to it once it is back. The client
    sees one uninterrupted stream, token for token what TP 1 generates."""
    from tokenizers import Tokenizer

    model = client.models.list().data[0].id
    pieces: list[str] = []
    outcome: dict[str, object] = {}

    def ask() -> None:
        try:
            stream = client.completions.create(
                model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=48, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for chunk in stream:
                pieces.append(chunk.choices[0].text)
                if chunk.choices[0].finish_reason:
                    outcome["finish"] = chunk.choices[0].finish_reason
        except Exception as exc:
            outcome["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    deadline = time.monotonic() + 120
    while len(pieces) < 6:  # decoding by now
        assert time.monotonic() < deadline and asker.is_alive(), outcome
        time.sleep(0.05)
    ranks = rank_pids(up.run_dir)
    segments = mpich_segments(list(ranks.values()))
    assert segments  # MPICH's shared memory of the group (its name already unlinked)
    restart = up.next_restart("worker-agg-g0-i0")
    os.kill(ranks[1], signal.SIGKILL)
    up.wait_for_line(
        re.compile(rf"worker-agg-g0-i0 exited with code \S+; restart {restart} of"), 60
    )
    up.wait_back("worker-agg-g0-i0", restart, 300)
    asker.join(timeout=300)
    assert not asker.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["finish"] == "length"
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    expected = tokenizer.decode(tp1_tokens(model_dir, PROMPT_IDS, 48), skip_special_tokens=True)
    assert "".join(pieces) == expected
    log = (up.run_dir / "logs" / "worker-agg-g0-i0.log").read_text()
    assert "engine failed" in log and "deregistered" in log
    assert "died from signal SIGKILL" in log
    assert [pid for pid in ranks.values() if pid_alive(pid)] == []
    assert sorted(rank_pids(up.run_dir)) == [0, 1, 2]  # the new group
    assert up.popen.poll() is None
    # The crashed group never reached MPI_Finalize, MPICH's only unlink: no name of its
    # segments may be left in /dev/shm (tmpfs: RAM), nor of the new group's.
    new_segments = mpich_segments(list(rank_pids(up.run_dir).values()))
    assert new_segments and new_segments.isdisjoint(segments)
    assert [name for name in segments | new_segments if (SHM / name).exists()] == []


def test_sigterm_stops_every_rank(tmp_path: Path) -> None:
    """A deployment of its own: SIGTERM to `hpcserve up` stops the leader (exit 0: it told
    the followers to stop) and every rank."""
    run_dir = tmp_path / "run"
    up = UpProcess(["configs/local-tp3.yaml", "--set", "frontend.port=0"], run_dir)
    try:
        up.wait_ready(timeout_s=300)
        ranks = rank_pids(run_dir)
        assert sorted(ranks) == [0, 1, 2]
        up.popen.send_signal(signal.SIGTERM)
        assert up.finish(timeout_s=90) == 0, up.output
        assert "stopped worker-agg-g0-i0 (exit 0)" in up.output
        assert [pid for pid in ranks.values() if pid_alive(pid)] == []
        assert processes_mentioning(str(run_dir)) == []
        log = (run_dir / "logs" / "worker-agg-g0-i0.log").read_text()
        assert log.count("leader said stop") == 2
    finally:
        up.kill_all()

"""Tensor parallelism for real: `mpirun -n N` (CPU, gloo) against the same model at TP=1.

Greedy tokens must be identical; logits may differ by fp32 summation order (all-reduce of
partial sums), so they are compared within 1e-4 plus 1e-5 of the largest logit's magnitude
(observed: ~5e-6 on the tiny models; on SmolLM2's logits of magnitude ~20, ~5e-5 without
AVX-512 and 1.05e-4 with it, where TP=1 takes the C kernels' summation order). A wrong shard
or a missed all-reduce moves logits by whole units.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpcserve.launcher import mpi_launcher

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = str(HERE / "tp_script.py")
ENGINE_TESTS = HERE / "engine"
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-5
TINY_PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
# SmolLM2 token ids: a chat-formatted question, a plain sentence start, a short prompt.
SMOL_PROMPTS = [[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2], [504, 3575, 282, 4649, 314],
                [28, 20, 2136, 2]]  # fmt: skip


def run_script(model_dir: Path, prompts, max_tokens: int, ranks: int, *extra: str, timeout=180):
    argv = [SCRIPT, str(model_dir), json.dumps(prompts), str(max_tokens), *extra]
    if ranks > 1:  # each rank under the guard, as `python -m mpi_workers` runs itself
        argv = [*mpi_launcher(), "-n", str(ranks), sys.executable, "-m", "mpi_workers.rank_guard",
                *argv]  # fmt: skip
    else:
        argv = [sys.executable, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done, (json.loads(lines[-1]) if lines else None)


def assert_same(base: dict, other: dict) -> None:
    assert other["tokens"] == base["tokens"]
    diff = max(
        abs(a - b)
        for x, y in zip(base["logits"], other["logits"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    scale = max(abs(a) for row in base["logits"] for a in row)
    assert diff < LOGIT_ATOL + LOGIT_RTOL * scale, (diff, scale)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama (8 heads, 4 KV heads, tied head) and Qwen2 (8 heads, 2 KV heads: replicated at
    TP=4; vocab 130: padded vocab shards; untied head, QKV biases), weights large enough
    that greedy tokens vary."""
    spec = importlib.util.spec_from_file_location("engine_conftest", ENGINE_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    write_tiny_model = module.write_tiny_model
    root = tmp_path_factory.mktemp("tiny-tp")
    return {
        "llama": write_tiny_model(root / "llama", "llama", num_attention_heads=8,
                                  num_key_value_heads=4, initializer_range=0.3),
        "qwen2": write_tiny_model(root / "qwen2", "qwen2", num_attention_heads=8,
                                  num_key_value_heads=2, vocab_size=130, initializer_range=0.3),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_tp2_tp4_equal_tp1(tiny_dirs: dict[str, Path], kind: str) -> None:
    done, base = run_script(tiny_dirs[kind], TINY_PROMPTS, 8, 1)
    assert base is not None, done.stderr
    assert len(set(map(tuple, base["tokens"]))) > 1  # not a degenerate model
    for ranks in (2, 4):
        done, result = run_script(tiny_dirs[kind], TINY_PROMPTS, 8, ranks)
        assert done.returncode == 0 and result is not None, done.stderr[-3000:]
        assert result["tp"] == ranks
        assert_same(base, result)


def test_prompt_logprobs_tp2_equal_tp1(tiny_dirs: dict[str, Path]) -> None:
    """Prompt logprobs under TP (every rank takes part in each slice's logits gather; the
    Qwen2 double's vocabulary of 130 is padded across the shards), prompts in chunks of 5."""
    options = ("--prompt-logprobs", "3", "--chunk", "5")
    done, base = run_script(tiny_dirs["qwen2"], TINY_PROMPTS, 4, 1, *options)
    assert base is not None, done.stderr[-3000:]
    assert [len(lp) for lp in base["prompt_logprobs"]] == [len(p) - 1 for p in TINY_PROMPTS]
    done, result = run_script(tiny_dirs["qwen2"], TINY_PROMPTS, 4, 2, *options)
    assert done.returncode == 0 and result is not None, done.stderr[-3000:]
    assert_same(base, result)
    for ours, theirs in zip(base["prompt_logprobs"], result["prompt_logprobs"], strict=True):
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < LOGIT_ATOL
    assert result["prompt_top"] == base["prompt_top"]


@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
def test_embeddings_tp2_equal_tp1(tiny_dirs: dict[str, Path], pooling: str) -> None:
    """Embeddings under TP: the leader's final hidden states are whole (each row-parallel
    output is all-reduced into the residual stream), prompts in chunks of 5 beside
    generations."""
    options = ("--embed", pooling, "--chunk", "5")
    done, base = run_script(tiny_dirs["llama"], TINY_PROMPTS, 4, 1, *options)
    assert base is not None, done.stderr[-3000:]
    assert [len(e) for e in base["embeddings"]] == [64] * len(TINY_PROMPTS)
    done, result = run_script(tiny_dirs["llama"], TINY_PROMPTS, 4, 2, *options)
    assert done.returncode == 0 and result is not None, done.stderr[-3000:]
    assert_same(base, result)
    for ours, theirs in zip(base["embeddings"], result["embeddings"], strict=True):
        assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-5


def test_logit_bias_reaches_the_sampling_leader(tiny_dirs: dict[str, Path]) -> None:
    """Followers only run the forward; rank 0 gathers the logits and samples with the
    request's own settings: at TP=2 (Qwen2: padded vocab shards), +100 on a token makes
    every greedy token that one, -100 on a greedy token takes it away."""
    model = tiny_dirs["qwen2"]
    done, plain = run_script(model, TINY_PROMPTS, 6, 2)
    assert done.returncode == 0 and plain is not None, done.stderr[-3000:]
    away = plain["tokens"][0][0]
    forced = (away + 1) % 130
    for bias in ({forced: 100.0}, {away: -100.0}):
        done, result = run_script(model, TINY_PROMPTS, 6, 2, "--logit-bias", json.dumps(bias))
        assert done.returncode == 0 and result is not None, done.stderr[-3000:]
        if forced in bias:
            assert all(tokens == [forced] * 6 for tokens in result["tokens"])
        else:
            assert all(away not in tokens for tokens in result["tokens"])
            assert result["tokens"] != plain["tokens"]


def test_smollm2_tp3_equals_tp1(model_dir: Path) -> None:
    done, base = run_script(model_dir, SMOL_PROMPTS, 12, 1)
    assert base is not None, done.stderr[-3000:]
    done, result = run_script(model_dir, SMOL_PROMPTS, 12, 3)
    assert done.returncode == 0 and result is not None, done.stderr[-3000:]
    assert_same(base, result)


def test_follower_killed_mid_request_fails_the_group(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    start = time.monotonic()
    out = tmp_path / "result.json"
    done, _ = run_script(
        tiny_dirs["llama"], TINY_PROMPTS, 60, 2, "--kill-rank", "1", "--kill-after", "3",
        "--out", str(out), timeout=60,
    )  # fmt: skip
    assert time.monotonic() - start < 60
    assert done.returncode != 0
    assert out.is_file(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["finish"] == ["error"] * 3
    assert all("tensor-parallel group failed" in e for e in result["errors"])
    assert "Connection" in result["failed"] or "closed" in result["failed"]


def worker_config(tmp_path: Path, model: Path, tp: int) -> Path:
    path = tmp_path / "config.yaml"
    data = {
        "model": {"path": str(model)},
        "workers": [{"tp": tp}],
        "services": {"etcd": {"start": False, "endpoint": "http://127.0.0.1:9"},
                     "nats": {"start": False, "endpoint": "nats://127.0.0.1:9"}},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


def run_worker(config: Path, ranks: int) -> subprocess.CompletedProcess[str]:
    argv = [*mpi_launcher(), "-n", str(ranks), sys.executable, "-m", "mpi_workers",
            "--config", str(config)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_wrong_world_size_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    done = run_worker(worker_config(tmp_path, model_dir, 3), 2)
    assert done.returncode == 2
    assert "workers.0.tp: the MPI world has 2 rank(s) but workers.0.tp is 3" in done.stderr
    assert "loading engine" not in done.stderr


def test_tp_not_dividing_heads_fails_before_model_load(tmp_path: Path, model_dir: Path) -> None:
    done = run_worker(worker_config(tmp_path, model_dir, 2), 2)
    assert done.returncode == 2
    assert "workers.0.tp: tp 2 does not divide the model's 9 attention heads" in done.stderr
    assert "[worker agg g0 i0 rank1]" in done.stderr
    assert "loading engine" not in done.stderr and "loaded" not in done.stderr

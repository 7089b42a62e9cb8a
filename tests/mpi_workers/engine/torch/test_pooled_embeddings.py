"""Embeddings (`GenerateRequest.pooling`) on the real SmolLM2-135M against HF transformers'
own `AutoModel(ids).last_hidden_state` pooled the same way: LAST and MEAN, one input and a
batch of different lengths at once, prompts over several prefill chunks, a prefix already
cached, Matryoshka truncation, mixed with generation, overlapped scheduling, preemption.

SmolLM2 is not an embedding model; pooling its final-norm hidden states is still a
well-defined computation to check. fp32 on CPU: agreement to float rounding.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch_engines import running_engine

from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    PoolingParams,
    SamplingParams,
    decode_embedding,
)
from mpi_workers.engine.streaming import RequestValidationError
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = pytest.mark.model

CHUNK = 32  # max_num_batched_tokens: long prompts span several prefill chunks
ATOL = 1e-4
TEXTS = [
    "Slurm allocates nodes to jobs.",
    "The Message Passing Interface lets the ranks of a parallel program exchange data. A job "
    "on a cluster asks the scheduler for nodes, and the launcher starts one rank per core.",
    "Embeddings turn text into vectors for retrieval.",
    "Collective operations such as all-reduce combine values from every rank, while "
    "point-to-point sends move a buffer from one rank to another, and a barrier waits for "
    "all of them before any goes on. " * 2,
]
_ids = iter(range(10**6))


def embed(ids: list[int], pooling_type: str = "LAST", **kw) -> GenerateRequest:
    pooling = PoolingParams(pooling_type=pooling_type, **kw)  # type: ignore[arg-type]
    return GenerateRequest(request_id=f"e{next(_ids)}", token_ids=ids, pooling=pooling)


@pytest.fixture(scope="module")
def prompts(smol_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    ids = [list(tokenizer(text)["input_ids"]) for text in TEXTS]
    assert len(ids[1]) > CHUNK and len(ids[3]) > 2 * CHUNK
    return ids


@pytest.fixture(scope="module")
def hidden(smol_dir, prompts) -> list[torch.Tensor]:
    """transformers' last_hidden_state [tokens, hidden] of each prompt, alone."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(smol_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        states = [model(torch.tensor([ids])).last_hidden_state[0] for ids in prompts]
    del model
    return states


def reference(states: torch.Tensor, pooling_type: str = "LAST", normalize: bool = True,
              dimensions: int | None = None) -> torch.Tensor:  # fmt: skip
    vector = states[-1] if pooling_type == "LAST" else states.mean(dim=0)
    if dimensions is not None:
        vector = vector[:dimensions]
    return torch.nn.functional.normalize(vector, dim=0) if normalize else vector


def vector_of(out: GenerateOutput) -> torch.Tensor:
    assert out.finish_reason == "stop" and out.token_ids == [] and out.embedding is not None
    return torch.tensor(decode_embedding(out.embedding))


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=atol), (got - want).abs().max()


@pytest.fixture(scope="module")
def engine(smol_dir):
    with running_engine(smol_dir, num_blocks=256, max_num_seqs=8,
                        max_num_batched_tokens=CHUNK) as e:  # fmt: skip
        yield e


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
async def test_one_input_matches_transformers(engine, prompts, hidden, pooling_type):
    await engine.reset_prefix_cache()
    for ids, states in zip(prompts, hidden, strict=True):
        out = await engine.generate_all(embed(ids, pooling_type))
        assert out.num_prompt_tokens == len(ids)
        assert_close(vector_of(out), reference(states, pooling_type))


async def test_unnormalized_vector_is_the_raw_hidden_state(engine, prompts, hidden):
    out = await engine.generate_all(embed(prompts[1], "MEAN", normalize=False))
    got = vector_of(out)
    assert_close(got, reference(hidden[1], "MEAN", normalize=False), atol=1e-3)
    assert abs(float(got.norm()) - 1.0) > 0.1  # not scaled


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
async def test_batch_of_different_lengths_at_once(engine, prompts, hidden, pooling_type):
    await engine.reset_prefix_cache()
    steps = engine.stats.num_steps
    outs = await asyncio.gather(*(engine.generate_all(embed(ids, pooling_type)) for ids in prompts))
    # batched: fewer steps than the chunks of each prompt run alone
    alone = sum(-(-len(ids) // CHUNK) for ids in prompts)
    assert engine.stats.num_steps - steps < alone
    for out, states in zip(outs, hidden, strict=True):
        assert_close(vector_of(out), reference(states, pooling_type))


async def test_cached_prefix_last_reads_it_mean_recomputes(engine, prompts, hidden):
    await engine.reset_prefix_cache()
    first = await engine.generate_all(embed(prompts[3]))
    again = await engine.generate_all(embed(prompts[3]))
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= len(prompts[3]) - 16
    assert_close(vector_of(again), vector_of(first))
    computed = engine.stats.num_computed_prompt_tokens
    mean = await engine.generate_all(embed(prompts[3], "MEAN"))
    assert mean.num_cached_tokens == 0  # every row's hidden state is needed
    assert engine.stats.num_computed_prompt_tokens - computed == len(prompts[3])
    assert_close(vector_of(mean), reference(hidden[3], "MEAN"))


async def test_matryoshka_dimensions_cut_then_normalize(engine, prompts, hidden):
    out = await engine.generate_all(embed(prompts[0], dimensions=64))
    got = vector_of(out)
    assert got.shape == (64,)
    assert_close(got, reference(hidden[0], dimensions=64))


async def test_dimensions_over_the_hidden_size_are_refused(engine, prompts):
    with pytest.raises(RequestValidationError) as caught:
        engine.generate(embed(prompts[0], dimensions=engine.config.hidden_size + 1))
    assert caught.value.param == "pooling"


async def test_prompt_of_max_model_len_is_embedded_one_more_is_not(smol_dir):
    e = TorchEngine(smol_dir, num_blocks=64, max_model_len=40, max_num_batched_tokens=CHUNK)
    await e.start()
    try:
        out = await e.generate_all(embed(list(range(100, 140))))
        assert vector_of(out).shape == (e.config.hidden_size,)
        with pytest.raises(RequestValidationError) as caught:
            e.generate(embed(list(range(100, 141))))
        assert caught.value.param == "token_ids"
    finally:
        await e.shutdown()


async def test_generation_beside_embeddings_is_unchanged(engine, prompts, hidden):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = await engine.generate_all(
        GenerateRequest(request_id=f"g{next(_ids)}", token_ids=prompts[1], sampling=greedy)
    )
    mixed = await asyncio.gather(
        engine.generate_all(
            GenerateRequest(request_id=f"g{next(_ids)}", token_ids=prompts[1], sampling=greedy)
        ),
        engine.generate_all(embed(prompts[3], "MEAN")),
        engine.generate_all(embed(prompts[2])),
    )
    assert mixed[0].token_ids == alone.token_ids and mixed[0].embedding is None
    assert_close(vector_of(mixed[1]), reference(hidden[3], "MEAN"))
    assert_close(vector_of(mixed[2]), reference(hidden[2]))


async def test_overlapped_engine_gives_the_same(smol_dir, prompts, hidden):
    e = TorchEngine(smol_dir, num_blocks=256, max_num_batched_tokens=CHUNK, overlap=True)
    await e.start()
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        outs = await asyncio.gather(
            e.generate_all(GenerateRequest(request_id="o1", token_ids=prompts[0], sampling=greedy)),
            e.generate_all(embed(prompts[3], "MEAN")),
            e.generate_all(embed(prompts[1])),
        )
        assert len(outs[0].token_ids) == 20
        assert_close(vector_of(outs[1]), reference(hidden[3], "MEAN"))
        assert_close(vector_of(outs[2]), reference(hidden[1]))
    finally:
        await e.shutdown()


async def test_preempted_mean_embedding_sums_each_row_once(smol_dir, prompts, hidden):
    """A pool of 6 blocks beside a generation that grows to 6: the embeddings are preempted
    mid-prompt, again and again, and recomputed; each MEAN vector still averages each
    position exactly once."""
    e = TorchEngine(smol_dir, num_blocks=6, block_size=16, max_num_seqs=8,
                    max_num_batched_tokens=24)  # fmt: skip
    await e.start()
    try:
        long = prompts[3]
        greedy = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
        generation = GenerateRequest(request_id="g", token_ids=long[:10], sampling=greedy)
        outs = await asyncio.gather(
            e.generate_all(generation),
            e.generate_all(embed(long, "MEAN")),
            e.generate_all(embed(long[:50], "MEAN")),
        )
        assert e.scheduler.num_preemptions > 0 and len(outs[0].token_ids) == 80
        assert_close(vector_of(outs[1]), reference(hidden[3], "MEAN"))
        from transformers import AutoModel

        model = AutoModel.from_pretrained(smol_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            short = model(torch.tensor([long[:50]])).last_hidden_state[0]
        assert_close(vector_of(outs[2]), reference(short, "MEAN"))
    finally:
        await e.shutdown()

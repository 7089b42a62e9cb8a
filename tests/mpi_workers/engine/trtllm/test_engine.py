"""The TensorRT-LLM adapter in-process, against the TEST DOUBLE of `tensorrt_llm`
(`tests/trtllm_double`; the real library cannot be installed here)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contract.config import ConfigError, load_config
from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    GuidedDecoding,
    SamplingParams,
    ThinkingFirst,
)
from mpi_workers.engine.factory import build_engine
from mpi_workers.engine.trtllm.engine import TrtllmEngine, decode_params, encode_params
from mpi_workers.engine.trtllm.llm_args import build_llm_args

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "trtllm_double"))
from double_env import activate

activate()

REPO = Path(__file__).resolve().parents[4]


def config(*overrides: str, path: str = "configs/local-trtllm-agg.yaml"):
    return load_config(REPO / path, overrides, environ={})


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[TrtllmEngine]:
    """One engine that can serve both phases (a KV cache transceiver configured)."""
    eng = build_engine(
        config("engine.trtllm.override_engine_args={cache_transceiver_config: {backend: UCX}}"),
        model_dir,
    )
    assert isinstance(eng, TrtllmEngine)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def request(prompt: list[int], **sampling) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, token_ids=prompt, sampling=SamplingParams(**sampling)
    )


async def collect(stream: AsyncIterator[GenerateOutput]) -> tuple[list[int], GenerateOutput]:
    tokens: list[int] = []
    last = None
    async for chunk in stream:
        tokens.extend(chunk.token_ids)
        last = chunk
    assert last is not None and last.finish_reason is not None
    return tokens, last


def test_llm_args_layers(model_dir: Path, tmp_path: Path) -> None:
    yaml_file = tmp_path / "engine.yaml"
    yaml_file.write_text("max_batch_size: 7\nkv_cache_config:\n  free_gpu_memory_fraction: 0.5\n")
    cfg = config(
        f"engine.trtllm.extra_engine_args={yaml_file}", "workers.0.tp=2",
        "engine.trtllm.override_engine_args={kv_cache_config: {host_cache_size: 1024}}",
    )  # fmt: skip
    args = build_llm_args(cfg, cfg.workers[0], model_dir)
    assert args["tensor_parallel_size"] == 2 and args["max_batch_size"] == 7
    kv = args["kv_cache_config"]
    assert kv["free_gpu_memory_fraction"] == 0.5  # the YAML over our field
    assert kv["tokens_per_block"] == 16 and kv["enable_block_reuse"] is True  # ours kept
    assert kv["event_buffer_max_size"] > 0 and kv["host_cache_size"] == 1024  # override last


def test_a_bad_yaml_key_names_the_key(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("not_an_llm_api_key: 1\n")
    with pytest.raises(ValueError, match="not_an_llm_api_key"):
        build_engine(config(f"engine.trtllm.extra_engine_args={bad}"), model_dir)
    nested = tmp_path / "nested.yaml"
    nested.write_text("kv_cache_config:\n  no_such_kv_field: 1\n")
    with pytest.raises(ValueError, match="no_such_kv_field"):
        build_engine(config(f"engine.trtllm.extra_engine_args={nested}"), model_dir)
    other_block = tmp_path / "block.yaml"
    other_block.write_text("kv_cache_config:\n  tokens_per_block: 32\n")
    with pytest.raises(ConfigError, match=r"engine\.block_size"):
        build_engine(config(f"engine.trtllm.extra_engine_args={other_block}"), model_dir)


async def test_stream_is_deltas_with_finish_and_usage(engine: TrtllmEngine) -> None:
    chunks = [c async for c in engine.generate(request([5, 6, 7, 8], max_tokens=6,
                                                       temperature=0.0, ignore_eos=True))]
    assert sum(len(c.token_ids) for c in chunks) == 6
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].num_prompt_tokens == 4
    again, _ = await collect(engine.generate(request([5, 6, 7, 8], max_tokens=6,
                                                     temperature=0.0, ignore_eos=True)))
    assert again == [t for c in chunks for t in c.token_ids]


async def test_bad_requests_name_the_field(engine: TrtllmEngine) -> None:
    with pytest.raises(ValueError, match=r"^max_tokens"):
        engine.generate(request([1, 2], max_tokens=0))
    with pytest.raises(ValueError, match=r"^token_ids"):
        engine.generate(request([10**9]))


async def test_prompt_logprobs_are_declared_unsupported_and_refused(
    engine: TrtllmEngine,
) -> None:
    """TensorRT-LLM's prompt logprobs are each position's top k, not the prompt tokens' own:
    the card says so (the frontend's 400 names `echo`) and a direct caller is refused."""
    assert "prompt_logprobs" in engine.unsupported_params
    with pytest.raises(ValueError, match=r"^prompt_logprobs"):
        engine.generate(request([1, 2, 3], prompt_logprobs=1))


async def test_abort_ends_the_stream_and_reaches_the_engine(engine: TrtllmEngine) -> None:
    req = request([1, 2, 3], max_tokens=1000, ignore_eos=True)
    stream = engine.generate(req)
    first = await anext(stream)
    assert first.finish_reason is None
    in_engine = engine._running[req.request_id]  # the double's RequestOutput
    await engine.abort(req.request_id)
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "abort"
    assert in_engine.aborted()
    # a consumer that walks away (client disconnect) aborts it too
    req = request([1, 2, 3], max_tokens=1000, ignore_eos=True)
    stream = engine.generate(req)
    await anext(stream)
    in_engine = engine._running[req.request_id]
    await stream.aclose()
    assert in_engine.aborted()
    assert engine.load_metrics().active_sequences == 0


async def test_unseeded_sampled_choices_differ_and_choice_0_is_tensorrt_llms_own(
    engine: TrtllmEngine,
) -> None:
    """TensorRT-LLM samples an unseeded request with one fixed default seed (the double: 0),
    so the n choices of an unseeded request would be one text: choice i > 0 gets a seed of
    its own; choice 0, greedy choices and seeded ones are left as they were."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]

    async def sample(index: int, **sampling) -> list[int]:
        req = request(prompt, max_tokens=8, **sampling)
        req.choice_index = index
        tokens, _ = await collect(engine.generate(req))
        return tokens

    sampled = [await sample(i, temperature=0.8) for i in range(3)]
    assert len({tuple(t) for t in sampled}) == 3
    assert sampled[0] == await sample(0, temperature=0.8)  # TensorRT-LLM's own unseeded sample
    assert sampled[2] == await sample(2, temperature=0.8)  # deterministic, as unseeded is there
    greedy = [await sample(i, temperature=0.0) for i in range(2)]
    assert greedy[0] == greedy[1]
    assert await sample(1, temperature=0.8, seed=7) == await sample(0, temperature=0.8, seed=7)


async def test_context_then_generation_equals_aggregated(engine: TrtllmEngine) -> None:
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 11}, {"max_tokens": 1}):
        params = {"max_tokens": 9, **sampling}
        agg, _ = await collect(engine.generate(request([3, 1, 4, 1, 5, 9, 2, 6], **params)))
        req = request([3, 1, 4, 1, 5, 9, 2, 6], **params)
        first, blob = await engine.prefill_only(req)
        assert first.token_ids == [] and first.num_prompt_tokens == 8
        assert isinstance(blob["disaggregated_params"]["opaque_state"], str)  # base64 JSON
        decoded = decode_params(blob["disaggregated_params"])
        assert decoded.request_type == "generation_only"
        opaque = blob["disaggregated_params"]["opaque_state"]
        assert encode_params(decoded)["opaque_state"] == opaque
        disagg, _ = await collect(engine.generate_from_prefill(req, blob))
        assert disagg == agg, sampling


async def test_kv_events_arrive_rehashed_and_stats_feed_load(engine: TrtllmEngine) -> None:
    from contract.block_hash import block_hashes

    received: list = []
    engine.set_kv_event_sink(received.extend)
    prompt = list(range(200, 248))  # 3 blocks of 16
    await collect(engine.generate(request(prompt, max_tokens=2)))
    for _ in range(100):
        if any(e.kind == "stored" for e in received):
            break
        await asyncio.sleep(0.05)
    stored = [h for e in received if e.kind == "stored" for h in e.block_hashes]
    assert block_hashes(prompt, 16)[:3] == stored[:3]
    assert set(block_hashes(prompt, 16)) <= set(engine.cached_block_hashes())
    for _ in range(100):
        if engine.load_metrics().total_blocks:
            break
        await asyncio.sleep(0.05)
    assert engine.load_metrics().total_blocks > 0


async def test_a_worker_whose_engine_sends_no_kv_events_warns_once(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A KV router fed by a silent worker routes blind: the adapter says so, once."""
    from mpi_workers.engine.model_shape import ModelShape
    from mpi_workers.engine.trtllm import engine as engine_module

    monkeypatch.setattr(engine_module, "SILENT_ROUTER_S", 0.2)
    # the engine buffers no events (the override: layer 3 wins over the YAML's buffer)...
    cfg = config("engine.trtllm.override_engine_args={kv_cache_config: {event_buffer_max_size: 0}}")
    args = build_llm_args(cfg, cfg.workers[0], model_dir)
    eng = TrtllmEngine(  # ...but the worker was told to expect them
        args, model_name="m", shape=ModelShape.from_folder(model_dir), block_size=16,
        max_model_len=2048, kv_events=True,
    )  # fmt: skip
    await eng.start()
    try:
        await collect(eng.generate(request(list(range(300, 340)), max_tokens=2)))
        for _ in range(60):
            if "no KV cache event" in caplog.text:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # two more polls: still one warning
    finally:
        await eng.shutdown()
    assert caplog.text.count("no KV cache event from TensorRT-LLM") == 1


async def test_a_request_error_ends_the_stream_with_an_error_chunk(engine: TrtllmEngine) -> None:
    """TensorRT-LLM reports some failures only while streaming (`RequestError`; here: the KV
    cache cannot hold the request): the client gets an error, never a hang."""
    req = request([1, 2, 3], max_tokens=6000, ignore_eos=True)
    chunks = [c async for c in engine.generate(req)]
    assert chunks[-1].finish_reason == "error"
    assert chunks[-1].error is not None and "TensorRT-LLM rejected" in chunks[-1].error
    assert engine.load_metrics().active_sequences == 0


async def test_min_tokens_and_logit_bias_map_to_tensorrt_llms_fields(
    engine: TrtllmEngine,
) -> None:
    """min_tokens is TensorRT-LLM's `min_tokens` (the double ends on its end id no sooner
    either); logit_bias becomes `embedding_bias`, a float32 [vocab] tensor added to the
    logits (what TensorRT-LLM's own OpenAI server makes of it); neither set, both unset."""
    import torch

    plain = engine.sampling_params(SamplingParams())
    assert plain.min_tokens is None and plain.embedding_bias is None
    mapped = engine.sampling_params(SamplingParams(min_tokens=5, logit_bias={3: 2.5, 40: -100}))
    assert mapped.min_tokens == 5
    bias = mapped.embedding_bias
    assert isinstance(bias, torch.Tensor) and bias.dtype == torch.float32
    assert bias.shape == (engine.vocab_size,)
    expected = torch.zeros(engine.vocab_size)
    expected[3], expected[40] = 2.5, -100.0
    assert torch.equal(bias, expected)
    # a greedy answer the double ends early on its end id: min_tokens makes it longer
    def greedy(start: int, **sampling) -> GenerateRequest:
        return request([start, 7, 9], max_tokens=24, temperature=0.0, **sampling)

    ended = []
    for start in range(1, 60):
        tokens, last = await collect(engine.generate(greedy(start)))
        if last.finish_reason == "stop" and len(tokens) < 12:
            ended.append((start, len(tokens)))
    assert ended, "no prompt of the double ends early: the test cannot tell"
    for start, length in ended[:3]:
        tokens, last = await collect(engine.generate(greedy(start, min_tokens=12)))
        assert len(tokens) >= 12 > length, (start, tokens)


async def test_output_constraints_map_to_guided_decoding_params(
    engine: TrtllmEngine, model_dir: Path
) -> None:
    """json_object / json_schema / regex become TensorRT-LLM's `GuidedDecodingParams`, the
    LLM gets the configured grammar backend (xgrammar by default); a continuation of a
    migrated constrained output and a worker without a backend refuse naming `guided`."""
    from tensorrt_llm.llmapi import GuidedDecodingParams

    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    assert engine.sampling_params(SamplingParams()).guided_decoding is None
    for guided, expected in (
        (GuidedDecoding(kind="json_object"), GuidedDecodingParams(json_object=True)),
        (GuidedDecoding(kind="json_schema", spec=schema), GuidedDecodingParams(json=schema)),
        (GuidedDecoding(kind="regex", spec="[0-9]+"), GuidedDecodingParams(regex="[0-9]+")),
    ):
        assert engine.sampling_params(SamplingParams(guided=guided)).guided_decoding == expected
    assert "guided" not in engine.unsupported_params
    assert engine.llm.args.guided_decoding_backend == "xgrammar"
    resumed = GuidedDecoding(kind="json_object", generated=2)
    with pytest.raises(ValueError, match=r"^guided"):
        engine.generate(request([1, 2, 3], guided=resumed))
    # its grammar covers the whole output: a reasoning model's free thinking first is not
    # done (declared, so a frontend sends no fence; refused if one comes anyway)
    assert "guided_thinking" in engine.unsupported_params
    fenced = GuidedDecoding(kind="json_object", thinking=ThinkingFirst(close="</think>"))
    with pytest.raises(ValueError, match=r"^response_format.*whole output"):
        engine.generate(request([1, 2, 3], guided=fenced))
    cfg = config("engine.trtllm.guided_decoding_backend=llguidance")
    assert build_llm_args(cfg, cfg.workers[0], model_dir)["guided_decoding_backend"] == "llguidance"
    plain = build_engine(config("engine.trtllm.guided_decoding_backend=null"), model_dir)
    assert isinstance(plain, TrtllmEngine) and "guided" in plain.unsupported_params
    with pytest.raises(ValueError, match=r"^guided.*guided_decoding_backend"):
        plain.generate(request([1, 2, 3], guided=GuidedDecoding(kind="json_object")))
    await plain.shutdown()

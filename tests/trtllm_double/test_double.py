"""Tests of the TensorRT-LLM TEST DOUBLE itself: API surface, token rules, KV events,
disaggregation and the MPI launcher stand-in."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import double_env
import pytest

double_env.activate()

import tensorrt_llm  # noqa: E402
from tensorrt_llm import LLM, DisaggregatedParams, SamplingParams  # noqa: E402
from tensorrt_llm.executor.result import CompletionOutput, Logprob  # noqa: E402
from tensorrt_llm.executor.utils import RequestError  # noqa: E402
from tensorrt_llm.llmapi import (  # noqa: E402
    CacheTransceiverConfig,
    CapacitySchedulerPolicy,
    Eagle3DecodingConfig,
    EagleDecodingConfig,
    KvCacheConfig,
    SchedulerConfig,
)
from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_options  # noqa: E402

MakeLLM = Callable[..., LLM]
EOS = 2  # SmolLM2's <|im_end|>
PROMPT = [1, 9038, 2114, 314, 260, 3587, 30, 2, 198, 1, 4093, 198]


@pytest.fixture
def make_llm(model_dir: Path) -> Iterator[MakeLLM]:
    made: list[LLM] = []

    def make(**kwargs: object) -> LLM:
        llm = LLM(str(model_dir), **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()


def tokens(llm: LLM, prompt: list[int], **params: object) -> list[int]:
    out = llm.generate(prompt, SamplingParams(**params))
    return list(out.outputs[0].token_ids)


# --- surface ---------------------------------------------------------------------------
def test_it_is_the_double_and_says_so() -> None:
    assert tensorrt_llm._IS_TEST_DOUBLE
    assert "TEST DOUBLE" in (tensorrt_llm.__doc__ or "")
    assert "NOT NVIDIA" in (tensorrt_llm.__doc__ or "")
    assert tensorrt_llm.__version__.startswith("1.3.0rc")
    assert Path(tensorrt_llm.__file__).is_relative_to(double_env.DOUBLE_ROOT)


def test_slotted_kw_only_dataclasses() -> None:
    for cls in (SamplingParams, DisaggregatedParams):
        assert dataclasses.is_dataclass(cls) and hasattr(cls, "__slots__")
        with pytest.raises(TypeError):
            cls(1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            cls(no_such_field=1)  # type: ignore[call-arg]
    names = [f.name for f in dataclasses.fields(DisaggregatedParams)]
    assert names[:7] == [
        "request_type",
        "first_gen_tokens",
        "first_gen_log_probs",
        "first_gen_logits",
        "ctx_request_id",
        "opaque_state",
        "draft_tokens",
    ]
    sp = SamplingParams()
    assert (sp.max_tokens, sp.detokenize, sp.exclude_input_from_output, sp.n) == (32, True, True, 1)
    assert sp.best_of == 1 and sp.ignore_eos is False and sp.skip_special_tokens is True
    assert hasattr(CompletionOutput, "__slots__")
    assert Logprob(logprob=-0.5, rank=1).rank == 1


def test_sampling_and_disagg_params_validate() -> None:
    assert DisaggregatedParams(request_type="CONTEXT_ONLY").request_type == "context_only"
    with pytest.raises(ValueError, match="Unknown request type"):
        DisaggregatedParams(request_type="prefill")
    with pytest.raises(ValueError, match="Greedy decoding"):
        SamplingParams(n=2)
    assert SamplingParams(n=2, top_k=5).best_of == 2
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_llm_arguments_are_strict(model_dir: Path, make_llm: MakeLLM) -> None:
    with pytest.raises(ValueError, match="LLM got invalid argument: bogus"):
        LLM(str(model_dir), bogus=1)
    with pytest.raises(ValueError, match="bogus_key"):
        LLM(str(model_dir), kv_cache_config={"bogus_key": 1})
    with pytest.raises(ValueError, match="backend"):
        LLM(str(model_dir), cache_transceiver_config={"backend": "ucx"})
    with pytest.raises(ValueError, match=r"config\.json"):
        LLM(str(model_dir / "missing"))
    llm = make_llm(
        kv_cache_config={"tokens_per_block": 16},
        scheduler_config=SchedulerConfig(
            capacity_scheduler_policy=CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
        ),
        backend="pytorch",
        max_batch_size=8,
    )
    assert isinstance(llm.args.kv_cache_config, KvCacheConfig)
    assert llm.args.kv_cache_config.tokens_per_block == 16 and llm.args.max_batch_size == 8


def test_yaml_options_merge_and_build_configs(tmp_path: Path, model_dir: Path) -> None:
    yaml_file = tmp_path / "engine.yaml"
    yaml_file.write_text(
        "kv_cache_config: {event_buffer_max_size: 10}\n"
        "cache_transceiver_config: {backend: UCX, max_tokens_in_buffer: 16384}\n"
        "cuda_graph_config: null\n"
        "disable_overlap_scheduler: true\n"
        "speculative_config: {decoding_type: Eagle, max_draft_len: 3,\n"
        "  speculative_model_dir: /models/eagle, eagle3_one_model: true}\n"
    )
    base = {"model": str(model_dir), "kv_cache_config": KvCacheConfig(free_gpu_memory_fraction=0.5)}
    args = update_llm_args_with_extra_options(base, str(yaml_file))
    kv = args["kv_cache_config"]
    assert isinstance(kv, KvCacheConfig)
    assert (kv.free_gpu_memory_fraction, kv.event_buffer_max_size) == (0.5, 10)
    assert isinstance(args["cache_transceiver_config"], CacheTransceiverConfig)
    assert isinstance(args["speculative_config"], EagleDecodingConfig)
    assert str(args["speculative_config"].speculative_model) == "/models/eagle"
    assert args["cuda_graph_config"] is None and args["disable_overlap_scheduler"] is True
    llm = LLM(**args)
    try:
        assert isinstance(llm.args.speculative_config, Eagle3DecodingConfig)
    finally:
        llm.shutdown()
    yaml_file.write_text("kv_cache_config: {enable_block_reuse: true, typo_field: 3}\n")
    with pytest.raises(ValueError, match="typo_field"):
        update_llm_args_with_extra_options({}, str(yaml_file))


# --- generation ------------------------------------------------------------------------
def test_greedy_is_deterministic_and_seed_free(make_llm: MakeLLM) -> None:
    llm = make_llm()
    greedy = tokens(llm, PROMPT, max_tokens=12, ignore_eos=True)
    assert len(greedy) == 12 and all(32 <= t < 49151 for t in greedy)
    assert tokens(llm, PROMPT, max_tokens=12, ignore_eos=True, seed=99) == greedy
    assert tokens(llm, PROMPT, max_tokens=12, ignore_eos=True, temperature=0.0, seed=5) == greedy
    sampled = {
        seed: tokens(llm, PROMPT, max_tokens=12, ignore_eos=True, temperature=0.8, seed=seed)
        for seed in (1, 2)
    }
    assert sampled[1] != sampled[2] and sampled[1] != greedy
    again = tokens(llm, PROMPT, max_tokens=12, ignore_eos=True, temperature=0.8, seed=1)
    assert again == sampled[1]


async def test_streaming_yields_the_same_cumulative_object(make_llm: MakeLLM) -> None:
    llm = make_llm()
    result = llm.generate_async(
        PROMPT, SamplingParams(max_tokens=6, ignore_eos=True), streaming=True
    )
    seen = [(id(out), len(out.outputs[0].token_ids), out.finished) async for out in result]
    assert {s[0] for s in seen} == {id(result)}
    assert [s[1] for s in seen] == [1, 2, 3, 4, 5, 6]
    assert [s[2] for s in seen] == [False] * 5 + [True]
    assert result.outputs[0].finish_reason == "length"
    assert result.outputs[0].token_ids_diff == result.outputs[0].token_ids[-1:]
    once = llm.generate_async(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len([out async for out in once]) == 1 and once.finished
    assert (await llm.generate_async(PROMPT, SamplingParams(max_tokens=2))).finished


def test_end_id_stops_and_is_not_returned(make_llm: MakeLLM) -> None:
    llm = make_llm()
    for start in range(40, 400):
        prompt = [start, start + 1, start + 2]
        out = llm.generate(prompt, SamplingParams(max_tokens=40)).outputs[0]
        if out.finish_reason == "stop":
            break
    else:
        pytest.fail("no prompt hit the EOS rule")
    assert EOS not in out.token_ids and out.stop_reason is None and len(out.token_ids) < 40
    ended_at = len(out.token_ids)
    full = tokens(llm, prompt, max_tokens=40, ignore_eos=True)
    assert len(full) == 40 and full[:ended_at] == out.token_ids and EOS not in full
    later = llm.generate(prompt, SamplingParams(max_tokens=40, min_tokens=ended_at + 1))
    assert len(later.outputs[0].token_ids) > ended_at


def test_stop_token_ids(make_llm: MakeLLM) -> None:
    llm = make_llm()
    base = tokens(llm, PROMPT, max_tokens=10, ignore_eos=True)
    stop = next(t for i, t in enumerate(base) if i >= 2 and t not in base[:i])
    cut = base.index(stop)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=10, stop_token_ids=[stop])).outputs[0]
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", stop, base[:cut])
    kept = llm.generate(
        PROMPT,
        SamplingParams(max_tokens=10, stop_token_ids=[stop], include_stop_str_in_output=True),
    )
    assert kept.outputs[0].token_ids == base[: cut + 1]
    ignored = llm.generate(
        PROMPT, SamplingParams(max_tokens=10, stop_token_ids=[stop], ignore_eos=True)
    )
    assert ignored.outputs[0].finish_reason == "length"


def test_logprobs_are_consistent(make_llm: MakeLLM) -> None:
    llm = make_llm()
    out = llm.generate(PROMPT, SamplingParams(max_tokens=5, logprobs=2, ignore_eos=True))
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 5
    total = 0.0
    for token, entry in zip(comp.token_ids, comp.logprobs, strict=True):
        assert len(entry) == 2 and all(isinstance(v, Logprob) for v in entry.values())
        assert entry[token].rank == 1  # greedy picks the top token
        assert sorted(v.rank for v in entry.values()) == [1, 2]
        total += entry[token].logprob
    assert comp.cumulative_logprob == pytest.approx(total)
    assert llm.generate(PROMPT, SamplingParams(max_tokens=2)).outputs[0].cumulative_logprob is None


def test_text_in_and_out(make_llm: MakeLLM) -> None:
    llm = make_llm()
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=4, ignore_eos=True))
    assert out.prompt == "The capital of France is" and out.prompt_token_ids
    assert isinstance(out.outputs[0].text, str) and out.outputs[0].text
    quiet = llm.generate(PROMPT, SamplingParams(max_tokens=4, detokenize=False))
    assert quiet.outputs[0].text == "" and quiet.prompt is None
    bare = make_llm(skip_tokenizer_init=True)
    assert bare.tokenizer is None
    with pytest.raises(ValueError, match="end_id"):
        bare.generate_async(PROMPT, SamplingParams())
    assert bare.generate(PROMPT, SamplingParams(end_id=EOS, max_tokens=3)).outputs[0].text == ""


def test_stop_strings_and_multiple_outputs(make_llm: MakeLLM) -> None:
    llm = make_llm()
    text = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True)).outputs[0].text
    word = text.split()[2]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=8, stop=word)).outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", word) and word not in out.text
    two = llm.generate(PROMPT, SamplingParams(n=2, top_k=50, temperature=0.7, max_tokens=6))
    assert [o.index for o in two.outputs] == [0, 1]
    assert two.outputs[0].token_ids != two.outputs[1].token_ids


def test_synchronous_validation(make_llm: MakeLLM) -> None:
    llm = make_llm(max_num_tokens=20)
    for bad in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            llm.generate_async(PROMPT, SamplingParams(**bad))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_num_tokens"):
        llm.generate_async(list(range(100, 130)), SamplingParams())
    with pytest.raises(TypeError):
        llm.generate_async(3.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not supported"):
        llm.generate_async(PROMPT, SamplingParams(use_beam_search=True))


async def test_executor_errors_surface_when_iterated(make_llm: MakeLLM) -> None:
    llm = make_llm(max_seq_len=16)
    too_long = llm.generate_async(list(range(100, 120)), SamplingParams())
    with pytest.raises(RequestError, match="max_seq_len"):
        await too_long
    out_of_vocab = llm.generate_async([10**6], SamplingParams())
    with pytest.raises(RequestError, match="vocabulary"):
        async for _ in out_of_vocab:
            pass
    assert llm.generate(PROMPT, SamplingParams(max_tokens=2)).finished  # still serving


async def test_abort_mid_stream(make_llm: MakeLLM) -> None:
    llm = make_llm()
    result = llm.generate_async(
        PROMPT, SamplingParams(max_tokens=2000, ignore_eos=True), streaming=True
    )
    steps = 0
    async for out in result:
        steps += 1
        if steps == 3:
            out.abort()
    comp = result.outputs[0]
    assert result.finished and result.aborted() and comp.finish_reason == "cancelled"
    assert 3 <= len(comp.token_ids) < 2000


async def test_abort_while_queued(make_llm: MakeLLM) -> None:
    llm = make_llm(max_batch_size=1)
    running = llm.generate_async(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True))
    queued = llm.generate_async(PROMPT, SamplingParams(max_tokens=50))
    queued.abort()
    await queued
    assert queued.outputs[0].finish_reason == "cancelled" and queued.outputs[0].token_ids == []
    assert (await running).outputs[0].finish_reason == "length"


async def test_requests_interleave_and_ids_count_up(make_llm: MakeLLM) -> None:
    llm = make_llm()
    order: list[int] = []

    async def run() -> int:
        result = llm.generate_async(
            PROMPT, SamplingParams(max_tokens=10, ignore_eos=True), streaming=True
        )
        async for out in result:
            order.append(out.request_id)
        return result.request_id

    ids = await asyncio.gather(run(), run())
    assert sorted(ids) == [1, 2]
    assert set(order[:6]) == {1, 2}  # both advance, neither waits for the other to finish


# --- prefix cache, KV events, stats ------------------------------------------------------
def test_prefix_cache_and_event_shapes(make_llm: MakeLLM) -> None:
    llm = make_llm(kv_cache_config=KvCacheConfig(event_buffer_max_size=100, tokens_per_block=4))
    created = llm.get_kv_cache_events(timeout=0)
    assert created == [
        {
            "event_id": 0,
            "window_size": 8192,
            "data": {"type": "created", "num_blocks_per_cache_level": [256, 0]},
        }
    ]
    prompt = list(range(300, 310))
    first = llm.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    assert first.cached_tokens == 0
    events = llm.get_kv_cache_events(timeout=0)
    assert [e["event_id"] for e in events] == [1, 2]
    ctx, done = events[0]["data"], events[1]["data"]
    assert ctx["type"] == "stored" and ctx["parent_hash"] is None
    block = ctx["blocks"][0]
    assert set(block) == {"type", "block_hash", "tokens", "cache_level", "priority"}
    assert block["type"] == "stored_block" and (block["cache_level"], block["priority"]) == (0, 35)
    assert block["tokens"][0] == {"type": "unique_token", "token_id": 300, "token_extra_id": 0}
    block_tokens = [[t["token_id"] for t in b["tokens"]] for b in ctx["blocks"]]
    assert block_tokens == [prompt[:4], prompt[4:8]]
    assert all(0 <= b["block_hash"] < 2**64 for b in ctx["blocks"])
    # on finish: prompt + output minus the last sampled token (its KV was never computed)
    assert done["parent_hash"] == ctx["blocks"][-1]["block_hash"]
    out = first.outputs[0].token_ids
    assert [t["token_id"] for t in done["blocks"][0]["tokens"]] == prompt[8:] + out[:2]
    second = llm.generate([*prompt, 999], SamplingParams(max_tokens=2))
    assert second.cached_tokens == 8
    new_events = llm.get_kv_cache_events(timeout=0)
    assert all(e["data"]["parent_hash"] == ctx["blocks"][-1]["block_hash"] for e in new_events)


def test_eviction_emits_removed(make_llm: MakeLLM) -> None:
    kv = KvCacheConfig(max_tokens=16, tokens_per_block=4, event_buffer_max_size=100)
    llm = make_llm(kv_cache_config=kv)
    llm.generate(list(range(500, 508)), SamplingParams(max_tokens=1))
    stored = [e for e in llm.get_kv_cache_events(timeout=0) if e["data"]["type"] == "stored"]
    hashes = [b["block_hash"] for e in stored for b in e["data"]["blocks"]]
    assert len(hashes) == 2
    llm.generate(list(range(600, 608)), SamplingParams(max_tokens=5, ignore_eos=True))
    removed = [
        e["data"] for e in llm.get_kv_cache_events(timeout=0) if e["data"]["type"] == "removed"
    ]
    assert removed and set(hashes) <= {h for r in removed for h in r["block_hashes"]}
    assert set(removed[0]) == {"type", "block_hashes"}


def test_events_and_stats_only_when_enabled(make_llm: MakeLLM) -> None:
    plain = make_llm()
    plain.generate(PROMPT, SamplingParams(max_tokens=2))
    assert plain.get_kv_cache_events(timeout=0) == [] and plain.get_stats(timeout=0) == []
    no_reuse = make_llm(
        kv_cache_config=KvCacheConfig(enable_block_reuse=False, event_buffer_max_size=10)
    )
    no_reuse.generate(PROMPT, SamplingParams(max_tokens=2))
    again = no_reuse.generate(PROMPT, SamplingParams(max_tokens=2))
    assert no_reuse.get_kv_cache_events(timeout=0) == [] and again.cached_tokens == 0
    stats = make_llm(enable_iter_perf_stats=True, max_batch_size=64)
    stats.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    got = stats.get_stats(timeout=0)
    assert [s["iter"] for s in got] == [1, 2, 3]
    assert got[0]["maxNumActiveRequests"] == 64 and got[0]["numActiveRequests"] == 1
    assert set(got[0]["kvCacheStats"]) == {
        "maxNumBlocks",
        "freeNumBlocks",
        "usedNumBlocks",
        "tokensPerBlock",
        "allocTotalBlocks",
        "allocNewBlocks",
        "reusedBlocks",
        "missedBlocks",
        "cacheHitRate",
    }


def test_cache_salt_separates_prefixes(make_llm: MakeLLM) -> None:
    llm = make_llm(kv_cache_config=KvCacheConfig(tokens_per_block=4))
    prompt = list(range(700, 712))
    assert llm.generate(prompt, SamplingParams(max_tokens=2), cache_salt="a").cached_tokens == 0
    assert llm.generate(prompt, SamplingParams(max_tokens=2), cache_salt="a").cached_tokens == 8
    assert llm.generate(prompt, SamplingParams(max_tokens=2)).cached_tokens == 0


def test_full_kv_cache_fails_the_request(make_llm: MakeLLM) -> None:
    llm = make_llm(kv_cache_config=KvCacheConfig(max_tokens=16, tokens_per_block=4))
    with pytest.raises(RequestError, match="KV cache is full"):
        llm.generate(list(range(40, 44)), SamplingParams(max_tokens=30, ignore_eos=True))
    with pytest.raises(RequestError, match="KV cache blocks"):
        llm.generate(list(range(40, 60)), SamplingParams(max_tokens=1))
    assert llm.generate(list(range(40, 44)), SamplingParams(max_tokens=8)).finished


async def test_async_event_polling(make_llm: MakeLLM) -> None:
    llm = make_llm(kv_cache_config=KvCacheConfig(event_buffer_max_size=100))
    await llm.generate_async(list(range(40, 80)), SamplingParams(max_tokens=2))
    drained = [e async for e in llm.get_kv_cache_events_async(timeout=0)]
    assert [e["data"]["type"] for e in drained] == ["created", "stored"]
    started = time.monotonic()
    assert [e async for e in llm.get_kv_cache_events_async(timeout=0.2)] == []
    assert 0.15 < time.monotonic() - started < 2


# --- disaggregation ----------------------------------------------------------------------
def _transceiver() -> CacheTransceiverConfig:
    return CacheTransceiverConfig(backend="UCX", max_tokens_in_buffer=4096)


def test_context_only_result(make_llm: MakeLLM) -> None:
    llm = make_llm(cache_transceiver_config=_transceiver())
    params = SamplingParams(max_tokens=20)
    result = llm.generate(
        PROMPT, params, disaggregated_params=DisaggregatedParams(request_type="context_only")
    )
    assert params.max_tokens == 1  # forced on the caller's object, like the real PyTorch flow
    comp, disagg = result.outputs[0], result.disaggregated_params
    assert comp.finish_reason == "not_finished" and len(comp.token_ids) == 1
    assert comp.disaggregated_params is disagg
    assert disagg.request_type == "context_only" and disagg.first_gen_tokens == comp.token_ids
    assert disagg.ctx_request_id == result.request_id and disagg.draft_tokens is None
    assert isinstance(disagg.opaque_state, bytes)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}])
async def test_context_plus_generation_equals_aggregated(make_llm: MakeLLM, sampling: dict) -> None:
    agg = make_llm()
    ctx = make_llm(
        cache_transceiver_config=_transceiver(), kv_cache_config=KvCacheConfig(tokens_per_block=4)
    )
    gen = make_llm(
        cache_transceiver_config=_transceiver(),
        kv_cache_config=KvCacheConfig(tokens_per_block=4, event_buffer_max_size=100),
    )
    expected = tokens(agg, PROMPT, max_tokens=15, **sampling)
    first = await ctx.generate_async(
        PROMPT,
        SamplingParams(max_tokens=15, **sampling),
        disaggregated_params=DisaggregatedParams(request_type="context_only"),
    )
    # the Dynamo wire: asdict + base64 opaque_state, back to DisaggregatedParams
    wire = dataclasses.asdict(first.disaggregated_params)
    wire["opaque_state"] = base64.b64encode(wire["opaque_state"]).decode()
    params = DisaggregatedParams(**wire)
    params.opaque_state = base64.b64decode(params.opaque_state)
    params.request_type = "generation_only"
    result = gen.generate_async(
        PROMPT,
        SamplingParams(max_tokens=15, **sampling),
        disaggregated_params=params,
        streaming=True,
    )
    chunks = [list(out.outputs[0].token_ids_diff) async for out in result]
    assert chunks[0] == first.outputs[0].token_ids  # the decode stream emits the first token
    assert result.outputs[0].token_ids == expected
    assert result.outputs[0].finish_reason == first_finish(expected, 15)
    stored = [e for e in gen.get_kv_cache_events(timeout=0) if e["data"]["type"] == "stored"]
    # the transferred prompt counts as stored on the decode side
    blocks = stored[0]["data"]["blocks"]
    assert [t["token_id"] for b in blocks for t in b["tokens"]] == PROMPT


def first_finish(expected: list[int], max_tokens: int) -> str:
    return "length" if len(expected) == max_tokens else "stop"


def test_generation_only_checks_the_transfer(make_llm: MakeLLM) -> None:
    ctx = make_llm(cache_transceiver_config=_transceiver())
    gen = make_llm(cache_transceiver_config=_transceiver())
    first = ctx.generate(
        PROMPT,
        SamplingParams(),
        disaggregated_params=DisaggregatedParams(request_type="context_only"),
    )
    params = dataclasses.replace(first.disaggregated_params, request_type="generation_only")
    with pytest.raises(RequestError, match="KV cache transfer failed"):
        gen.generate_async(PROMPT[:-1], SamplingParams(), disaggregated_params=params).result()
    plain = make_llm()
    with pytest.raises(RequestError, match="cache_transceiver_config"):
        plain.generate_async(
            PROMPT,
            SamplingParams(),
            disaggregated_params=DisaggregatedParams(request_type="context_only"),
        ).result()


# --- MPI / launcher -----------------------------------------------------------------------
def test_parallel_llm_without_launcher_is_simulated(
    make_llm: MakeLLM, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TLLM_SPAWN_PROXY_PROCESS", raising=False)
    with caplog.at_level("INFO", logger="tensorrt_llm"):
        make_llm(tensor_parallel_size=2)
    assert "spawning 2 local workers (double: simulated)" in caplog.text


def test_unreachable_leader_is_a_clear_error(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("TLLM_SPAWN_PROXY_PROCESS", "1")
    monkeypatch.setenv("TLLM_SPAWN_PROXY_PROCESS_IPC_ADDR", f"tcp://127.0.0.1:{port}")
    monkeypatch.setenv("TLLM_SPAWN_PROXY_PROCESS_IPC_HMAC_KEY", "00" * 32)
    monkeypatch.setenv("TLLM_DOUBLE_CONNECT_TIMEOUT_S", "0.3")
    with pytest.raises(RuntimeError, match="could not reach the MPI leader"):
        LLM(str(model_dir), tensor_parallel_size=2)


def test_double_environ() -> None:
    env = double_env.double_environ({"PATH": "/usr/bin", "PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(double_env.DOUBLE_ROOT), "/x"]
    assert env["PATH"].split(os.pathsep)[0] == str(double_env.DOUBLE_ROOT / "bin")
    assert double_env.double_environ(env) == env
    double_env.activate()
    double_env.activate()
    assert sys.path.count(str(double_env.DOUBLE_ROOT)) == 1


_MPI_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
from tensorrt_llm import LLM, SamplingParams
with LLM(sys.argv[1], tensor_parallel_size=int(sys.argv[2])) as llm:
    print("tokens", llm.generate([1, 2, 3], SamplingParams(max_tokens=4)).outputs[0].token_ids)
"""


def _launch(model_dir: Path, ranks: int, tp: int) -> subprocess.CompletedProcess[str]:
    mpirun = Path(sys.executable).parent / "mpirun"
    command = [
        str(mpirun),
        "-n",
        str(ranks),
        "trtllm-llmapi-launch",
        sys.executable,
        "-c",
        _MPI_SCRIPT,
        str(model_dir),
        str(tp),
    ]
    env = double_environ_without_spawn()
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)


def double_environ_without_spawn() -> dict[str, str]:
    env = double_env.double_environ()
    for key in [k for k in env if k.startswith("TLLM_SPAWN_PROXY")]:
        del env[key]
    return env


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("mpirun", path=str(Path(sys.executable).parent)) is None,
    reason="needs the venv's mpirun",
)
def test_mpirun_launch_two_ranks(model_dir: Path) -> None:
    done = _launch(model_dir, ranks=2, tp=2)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "MPI session: 2 ranks on" in output and "tokens [" in output


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("mpirun", path=str(Path(sys.executable).parent)) is None,
    reason="needs the venv's mpirun",
)
def test_mpirun_launch_rank_mismatch_fails_fast(model_dir: Path) -> None:
    started = time.monotonic()
    done = _launch(model_dir, ranks=2, tp=4)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "MPI world size 2 does not match tensor_parallel_size (4)" in output
    assert time.monotonic() - started < 60


@pytest.mark.integration
def test_launcher_returns_the_command_status() -> None:
    env = double_environ_without_spawn()
    command = ["trtllm-llmapi-launch", sys.executable, "-c", "import sys; sys.exit(3)"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr

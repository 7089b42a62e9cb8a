"""Constrained output in the torch engine: the bitmask (CPU units) and the real SmolLM2 model
answering under a JSON Schema, greedy and sampled, after a migration, and with n choices."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from guided_schemas import PERSON, check_person

from contract.guided import grammar_for
from contract.messages import GenerateRequest, GuidedDecoding, SamplingParams
from mpi_workers.engine.streaming import RequestValidationError
from mpi_workers.engine.torch.engine import TorchEngine
from mpi_workers.engine.torch.guided import Guides, apply_bitmask
from mpi_workers.engine.torch.sampler import Sampler, SampleRow

_ids = iter(range(10**6))


def schema_guided() -> GuidedDecoding:
    return GuidedDecoding(kind="json_schema", spec=json.dumps(PERSON))


def test_bitmask_unpacks_to_the_allowed_columns():
    logits = torch.zeros(3, 70)
    mask = torch.zeros(2, 3, dtype=torch.int32)  # rows 0 and 2 of the logits
    mask[0, 0] = 1 << 5
    mask[0, 2] = -(2**31)  # bit 31 of word 2: token 95, beyond the 70 columns
    mask[1, 1] = 1 - 2**31  # bits 0 and 31 of word 1: tokens 32 and 63
    out = apply_bitmask(logits, [0, 2], mask)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [5]
    assert torch.isfinite(out[1]).all()  # the unconstrained row is untouched
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [32, 63]
    assert torch.isfinite(logits).all()  # a new tensor


@pytest.fixture(scope="module")
def guides(smol_dir) -> Guides:
    return Guides(smol_dir, 49152, frozenset({2}))


@pytest.fixture(scope="module")
def hf_tokenizer(smol_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smol_dir / "tokenizer.json"))


def test_matcher_follows_the_schema_and_stops_when_complete(guides, hf_tokenizer):
    """The mask admits the tokens of a valid document, consuming them leads to `stopped`,
    and a token that breaks the schema is forbidden."""
    text = '{"name": "Ann", "age": 31, "role": "user", "address": {"city": "Oslo"}, "tags": []}'
    ids = hf_tokenizer.encode(text).ids
    matcher = guides.matcher(schema_guided(), [])
    for k, token in enumerate(ids):
        mask = guides.bitmask([matcher])
        assert (mask[0, token // 32] >> (token % 32)) & 1, f"token {k} forbidden"
        assert guides.consume(matcher, token) is (k == len(ids) - 1)
    bad = hf_tokenizer.encode('{"name": 5').ids
    matcher = guides.matcher(schema_guided(), bad[:-1])  # fed a prefix: as after migration
    mask = guides.bitmask([matcher])
    assert not (mask[0, bad[-1] // 32] >> (bad[-1] % 32)) & 1


def test_sampler_keeps_greedy_and_sampled_rows_inside_the_mask(guides):
    """Whatever the logits favour, greedy and temperature-1 rows pick allowed tokens; the
    logprobs stay those of the unconstrained distribution."""
    matcher = guides.matcher(GuidedDecoding(kind="regex", spec="[0-9]{3}"), [])
    allowed = guides.bitmask([matcher])[0]
    sampler = Sampler(seed=0, guides=guides)
    logits = torch.randn(3, 49152)
    logits[:, 100] = 50.0  # "best" token, not a digit
    rows = []
    for temperature, guide in ((0.0, matcher), (1.0, matcher.deep_copy()), (0.0, None)):
        params = SamplingParams(temperature=temperature, logprobs=0)
        rows.append(SampleRow(params, [1, 2], 2, None, guide))
    tokens, logprobs = sampler(logits, rows)
    for token in tokens[:2]:
        assert (allowed[token // 32] >> (token % 32)) & 1
    assert tokens[2] == 100
    plain = logits[0].log_softmax(-1)[tokens[0]].item()
    assert logprobs[0] is not None and logprobs[0].logprob == pytest.approx(plain, abs=1e-4)


@pytest.fixture(scope="module")
def prompt(hf_tokenizer) -> list[int]:
    text = (
        "<|im_start|>user\nDescribe a person as JSON with name, age, role, address and tags."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    return hf_tokenizer.encode(text).ids


def request(ids: list[int], guided: GuidedDecoding, **sampling) -> GenerateRequest:
    params = SamplingParams(max_tokens=120, guided=guided, stop_token_ids=[2], **sampling)
    return GenerateRequest(request_id=f"g{next(_ids)}", token_ids=ids, sampling=params)


@pytest.mark.model
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_engine_output_validates_against_the_schema(
    engine, hf_tokenizer, prompt, temperature
):
    outs = await asyncio.gather(*(
        engine.generate_all(request(prompt, schema_guided(), temperature=temperature, seed=s))
        for s in range(3)
    ))  # fmt: skip
    for out in outs:
        assert out.finish_reason == "stop", out
        check_person(json.loads(hf_tokenizer.decode(out.token_ids)))
    assert 2 not in outs[0].token_ids  # complete: stopped on the grammar, before any EOS


@pytest.mark.model
async def test_json_object_and_a_plain_row_side_by_side(engine, hf_tokenizer, prompt):
    guided, plain = await asyncio.gather(
        engine.generate_all(request(prompt, GuidedDecoding(kind="json_object"), temperature=0)),
        engine.generate_all(GenerateRequest(
            request_id=f"g{next(_ids)}", token_ids=prompt,
            sampling=SamplingParams(max_tokens=12, temperature=0.0),
        )),
    )  # fmt: skip
    assert guided.finish_reason == "stop"
    assert isinstance(json.loads(hf_tokenizer.decode(guided.token_ids)), dict)
    assert not hf_tokenizer.decode(plain.token_ids).startswith("{")  # not constrained


@pytest.mark.model
async def test_a_migrated_continuation_finishes_the_same_document(engine, hf_tokenizer, prompt):
    """Greedy: the first 10 tokens, then a continuation (those tokens in the prompt,
    `generated` = 10) gives exactly the uninterrupted run's rest."""
    whole = await engine.generate_all(request(prompt, schema_guided(), temperature=0.0))
    head = whole.token_ids[:10]
    resumed = GuidedDecoding(kind="json_schema", spec=json.dumps(PERSON), generated=10)
    rest = await engine.generate_all(request(prompt + head, resumed, temperature=0.0))
    assert head + rest.token_ids == whole.token_ids
    # without `generated` the matcher would start a new document after the head: refused
    fresh = await engine.generate_all(request(prompt + head, schema_guided(), temperature=0.0))
    assert head + fresh.token_ids != whole.token_ids


@pytest.mark.model
async def test_disaggregated_prefill_and_decode_give_the_aggregated_document(
    engine, smol_dir, hf_tokenizer, prompt
):
    """The prefill engine constrains the first token, the decode engine's matcher consumes
    it and goes on: greedy, the very tokens of an aggregated run. A first token that
    completes the output (a one-token choice) ends it at the prefill ("stop")."""
    decode = TorchEngine(smol_dir, num_blocks=256, max_num_seqs=4)
    await decode.start()
    try:
        for guided in (schema_guided(), GuidedDecoding(kind="regex", spec="(?:Sure)|(?:No)")):
            whole = await engine.generate_all(request(prompt, guided, temperature=0.0))
            disagg = request(prompt, guided, temperature=0.0)
            await engine.reset_prefix_cache()
            held = await engine.prefill_and_hold(disagg)
            if guided.kind == "regex":  # "Sure" and "No" are one token each
                assert len(whole.token_ids) == 1 and held.first.finish_reason == "stop"
                assert held.first.token_ids == whole.token_ids
                await engine.release_held(held)
                continue
            assert held.first.finish_reason is None
            reservation = await decode.reserve(disagg)
            assert reservation is not None
            await decode.import_kv(reservation, await engine.export_held(held, 0))
            await engine.release_held(held)
            tokens, last = list(held.first.token_ids), None
            async for output in decode.decode_reserved(reservation, held.first, None):
                tokens.extend(output.token_ids)
                last = output
            assert last is not None and last.finish_reason == "stop"
            assert tokens == whole.token_ids
            check_person(json.loads(hf_tokenizer.decode(tokens)))
    finally:
        await decode.shutdown()


@pytest.mark.model
async def test_an_output_that_breaks_its_constraint_fails_alone(engine, hf_tokenizer, prompt):
    """A continuation whose earlier output is no JSON (a matcher cannot be fed it) ends with
    an error naming the constraint; the plain request in the same steps finishes normally."""
    head = hf_tokenizer.encode("Sure, here").ids
    broken = GuidedDecoding(kind="json_object", generated=len(head))
    plain = GenerateRequest(request_id=f"g{next(_ids)}", token_ids=prompt,
                            sampling=SamplingParams(max_tokens=8, temperature=0.0))  # fmt: skip
    bad, good = await asyncio.gather(
        engine.generate_all(request(prompt + head, broken, temperature=0.0)),
        engine.generate_all(plain),
    )
    assert bad.finish_reason == "error" and bad.error is not None
    assert bad.error.startswith("guided:") and not bad.token_ids
    assert good.finish_reason == "length" and len(good.token_ids) == 8


@pytest.mark.model
def test_engine_refuses_a_bad_constraint(engine, prompt):
    bad = GuidedDecoding(kind="json_schema", spec='{"type": "frob"}')
    with pytest.raises(RequestValidationError, match="frob"):
        engine.validate(request(prompt, bad))
    assert grammar_for(schema_guided())  # a good one builds (and is cached)

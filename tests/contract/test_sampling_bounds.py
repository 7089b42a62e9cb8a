"""The sampling ranges are defined once (contract.messages.SAMPLING_BOUNDS): the OpenAI
request schema and the engine's request check admit and refuse the same values, each
refusal naming the field."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from contract.messages import SAMPLING_BOUNDS, Bounds, GenerateRequest, SamplingParams
from frontend.openai_schemas import CompletionRequest
from mpi_workers.engine.streaming import RequestValidationError, validate_request


def edge_values(bounds: Bounds) -> list[tuple[float, bool]]:
    """(value, admitted) at and just past each end of `bounds`."""
    values: list[tuple[float, bool]] = []
    for end, inward, closed in (
        (bounds.low, 1, not bounds.low_open),
        (bounds.high, -1, True),
    ):
        if end is None:
            continue
        step = 1 if isinstance(end, int) else 0.01
        values += [(end, closed), (end - inward * step, False), (end + inward * step, True)]
    return values


def engine_admits(name: str, value: float) -> bool:
    params = SamplingParams(**{name: value})
    try:
        validate_request(GenerateRequest(request_id="r", token_ids=[1], sampling=params), 64, 10)
    except RequestValidationError as error:
        assert error.param == name
        return False
    return True


def schema_admits(name: str, value: float) -> bool:
    try:
        CompletionRequest(prompt="hi", **{name: value})
    except ValidationError as error:
        first = error.errors()[0]
        # a field's own range, or a rule across fields that names it first (max_tokens 0)
        assert first["loc"] == (name,) or first["msg"].startswith(f"Value error, {name}:")
        return False
    return True


# Engine fields the request sets under another name: prompt_logprobs is `logprobs` with `echo`
SCHEMA_NAME = {"prompt_logprobs": "logprobs"}


@pytest.mark.parametrize("name", sorted(SAMPLING_BOUNDS))
def test_schema_and_engine_admit_the_same_values(name: str) -> None:
    for value, admitted in edge_values(SAMPLING_BOUNDS[name]):
        assert engine_admits(name, value) is admitted, (name, value)
        assert schema_admits(SCHEMA_NAME.get(name, name), value) is admitted, (name, value)
    if name in SCHEMA_NAME:
        assert SAMPLING_BOUNDS[name] == SAMPLING_BOUNDS[SCHEMA_NAME[name]]


def test_max_tokens_zero_only_for_the_prompt_logprobs() -> None:
    """The schema's one exception to max_tokens >= 1: echo + logprobs, the prompt alone."""
    assert CompletionRequest(prompt="hi", max_tokens=0, echo=True, logprobs=0).max_tokens == 0
    assert not schema_admits("max_tokens", -1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_float_range_admits_nan_or_infinity(value: float) -> None:
    assert not engine_admits("temperature", value)
    assert not Bounds(0.0, low_open=True).admits(math.nan)


def test_descriptions_name_the_interval() -> None:
    assert SAMPLING_BOUNDS["top_p"].describe() == "must be in (0, 1]"
    assert SAMPLING_BOUNDS["max_tokens"].describe() == "must be >= 1"
    assert SAMPLING_BOUNDS["repetition_penalty"].describe() == "must be > 0"
    assert SAMPLING_BOUNDS["seed"].describe() == f"must be in [{-(2**63)}, {2**63 - 1}]"


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"logit_bias": {10: 1.0}}, "logit_bias"),  # the vocabulary is 0..9
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: 100.01}}, "logit_bias"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        ({"logit_bias": dict.fromkeys(range(301), 1.0)}, "logit_bias"),
        ({"min_tokens": 17}, "min_tokens"),  # max_tokens defaults to 16
        ({"min_tokens": 3, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_the_engine_refuses_bad_logit_bias_and_min_tokens_naming_them(
    sampling: dict, param: str
) -> None:
    """Engine callers skip the frontend: validate_request checks them again."""
    request = GenerateRequest(request_id="r", token_ids=[1], sampling=SamplingParams(**sampling))
    with pytest.raises(RequestValidationError) as caught:
        validate_request(request, 64, 10)
    assert caught.value.param == param


def test_the_engine_admits_logit_bias_at_its_bounds() -> None:
    sampling = SamplingParams(min_tokens=16, logit_bias={0: -100.0, 9: 100.0})
    validate_request(GenerateRequest(request_id="r", token_ids=[1], sampling=sampling), 64, 10)

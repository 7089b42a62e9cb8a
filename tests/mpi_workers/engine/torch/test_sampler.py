"""Sampler masks and penalties on hand-made logits."""

from __future__ import annotations

import math

import torch

from contract.messages import SamplingParams
from mpi_workers.engine.torch.sampler import (
    Sampler,
    SampleRow,
    apply_logit_rules,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)

NEG = float("-inf")


def row(**kw) -> SampleRow:
    prompt = kw.pop("prompt", [])
    output = kw.pop("output", [])
    return SampleRow(SamplingParams(**kw), prompt + output, len(prompt))


def test_top_k_keeps_k_largest_and_zero_disables():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, 0]))
    assert out[0].tolist() == [NEG, 4.0, 3.0, NEG]
    assert out[1].tolist() == logits[1].tolist()


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    out = apply_top_p(logits, torch.tensor([0.7]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = apply_top_p(logits, torch.tensor([0.8]))  # 0.5+0.3 reaches 0.8 exactly
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = apply_top_p(logits, torch.tensor([0.1]))  # best token always stays
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    out = apply_top_p(logits, torch.tensor([1.0]))
    assert torch.isfinite(out).all()


def test_top_p_respects_unsorted_order():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    out = apply_top_p(logits, torch.tensor([0.7]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True]


def test_min_p_relative_to_best():
    logits = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()
    out = apply_min_p(logits, torch.tensor([0.2]))  # threshold 0.12
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits, [row(repetition_penalty=2.0, prompt=[0], output=[1])])
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.5]


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.zeros(1, 4)
    out = apply_penalties(
        logits, [row(presence_penalty=0.5, frequency_penalty=0.25, prompt=[3], output=[1, 1, 2])]
    )
    assert out[0].tolist() == [0.0, -1.0, -0.75, 0.0]


def test_penalties_are_per_row():
    logits = torch.ones(2, 3)
    out = apply_penalties(logits, [row(frequency_penalty=1.0, output=[0]), row(output=[0])])
    assert out[0].tolist() == [0.0, 1.0, 1.0]
    assert out[1].tolist() == [1.0, 1.0, 1.0]


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    tokens, lps = Sampler(0)(logits, [row(temperature=0.0, logprobs=2), row(temperature=0.0)])
    assert tokens == [1, 0]
    assert lps[1] is None
    expected = torch.log_softmax(logits[0], -1)
    assert math.isclose(lps[0].logprob, float(expected[1]), rel_tol=1e-6)
    assert [t.token_id for t in lps[0].top] == [1, 2]


def test_seeded_sampling_is_reproducible_per_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))

    def draw(rows_logits, params):
        rows = []
        for p in params:
            g = torch.Generator().manual_seed(p.pop("seed"))
            rows.append(SampleRow(SamplingParams(**p), [], 0, g))
        return Sampler(0)(rows_logits, rows)[0]

    alone = [draw(logits[:1], [dict(seed=7, temperature=1.0)])[0] for _ in range(1)]
    batched = draw(logits, [dict(seed=7, temperature=1.0), dict(seed=8), dict(seed=9, top_k=3)])
    assert batched[0] == alone[0]


def test_top_k_one_equals_greedy():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    rows = [row(temperature=1.5, top_k=1) for _ in range(4)]
    tokens, _ = Sampler(0)(logits, rows)
    assert tokens == logits.argmax(-1).tolist()


def test_logit_bias_is_added_to_its_rows_tokens_only():
    logits = torch.zeros(3, 6)
    rows = [row(logit_bias={1: 2.5, 4: -100.0}), row(), row(logit_bias={5: 100.0})]
    out = apply_logit_rules(logits, rows, frozenset())
    assert out[0].tolist() == [0.0, 2.5, 0.0, 0.0, -100.0, 0.0]
    assert out[1].tolist() == [0.0] * 6
    assert out[2].tolist() == [0.0] * 5 + [100.0]
    assert logits.eq(0).all()  # the caller's logits are left alone


def test_min_tokens_masks_eos_and_stop_ids_until_enough_tokens():
    logits = torch.zeros(4, 6)
    eos = frozenset({5})
    rows = [
        row(min_tokens=3, stop_token_ids=[2], prompt=[1, 1], output=[3, 3]),  # 2 < 3: masked
        row(min_tokens=3, stop_token_ids=[2], prompt=[1, 1], output=[3, 3, 3]),  # enough
        row(min_tokens=3, stop_token_ids=[2], ignore_eos=True, prompt=[1]),  # EOS stays
        row(stop_token_ids=[2]),  # no min_tokens
    ]
    finite = torch.isfinite(apply_logit_rules(logits, rows, eos)).tolist()
    assert finite[0] == [True, True, False, True, True, False]
    assert finite[1] == [True] * 6
    assert finite[2] == [True, True, False, True, True, True]
    assert finite[3] == [True] * 6


def test_greedy_follows_the_bias_and_the_min_tokens_mask():
    sampler = Sampler(seed=0, eos_token_ids=frozenset({0}))
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    rows = [
        row(temperature=0.0),
        row(temperature=0.0, logit_bias={3: 100.0}, logprobs=0),
        row(temperature=0.0, min_tokens=1),  # EOS (0) is the argmax: masked, 1 next
    ]
    tokens, logprobs = sampler(logits, rows)
    assert tokens == [0, 3, 1]
    assert logprobs[1] is not None and logprobs[1].logprob > -1e-3  # after the bias
    assert not Sampler.on_device(rows[1].params, None)
    assert not Sampler.on_device(rows[2].params, None)
    assert Sampler.on_device(rows[0].params, None)

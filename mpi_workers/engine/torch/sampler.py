"""Turn a batch of logits into next tokens, one set of sampling settings per row.

Penalties and the top-k / top-p / min-p masks are vectorised over the batch; the random draw
is per row from the request's own `torch.Generator` (seeded when the request gives a seed),
so a seeded request samples the same tokens whatever else shares its batch. Temperature 0
is greedy (argmax). Before the penalties, each row's `logit_bias` is added and, while it has
made fewer than `min_tokens` tokens, its end tokens are masked (`apply_logit_rules`). After
the penalties, a row with an output constraint keeps only the tokens its grammar allows
(`guided.Guides`). Logprobs are those of the model's distribution after the rules and the
penalties, before the constraint, temperature and truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from contract.messages import SamplingParams, TokenLogprob, TopLogprob
from mpi_workers.engine.torch import kernels
from mpi_workers.engine.torch.guided import Guides, apply_bitmask, guide_rows
from mpi_workers.engine.torch.host_copy import to_device


@dataclass
class SampleRow:
    """What the sampler needs about one row: settings, history, random source.

    `token_ids` is prompt + output so far (not copied; sliced only when a penalty needs it).
    """

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    guide: Any = None  # the row's llguidance matcher when its output is constrained

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


def apply_logit_rules(
    logits: torch.Tensor, rows: list[SampleRow], eos_token_ids: frozenset[int]
) -> torch.Tensor:
    """Each row's `logit_bias` added to its logits (OpenAI), and the tokens that would end
    it (EOS unless ignore_eos, stop_token_ids) at -inf while it has made fewer than
    `min_tokens` tokens (vLLM). One scatter each for the whole batch, on any device."""
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_values: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_ids += p.logit_bias.keys()
            bias_values += p.logit_bias.values()
        if p.min_tokens and len(r.token_ids) - r.num_prompt_tokens < p.min_tokens:
            ends = set(p.stop_token_ids) if p.ignore_eos else eos_token_ids.union(p.stop_token_ids)
            ban_rows += [i] * len(ends)
            ban_ids += ends
    if not bias_rows and not ban_rows:
        return logits
    device = logits.device
    logits = logits.clone()
    if bias_rows:
        where = (to_device(bias_rows, torch.long, device), to_device(bias_ids, torch.long, device))
        logits.index_put_(where, to_device(bias_values, logits.dtype, device), accumulate=True)
    if ban_rows:
        where = (to_device(ban_rows, torch.long, device), to_device(ban_ids, torch.long, device))
        logits.index_put_(where, logits.new_full((), float("-inf")))  # made on the device
    return logits


def apply_penalties(
    logits: torch.Tensor,
    rows: list[SampleRow],
) -> torch.Tensor:
    """Repetition (prompt + output, HF style); presence, frequency (output only, OpenAI style)."""
    batch, vocab = logits.shape
    rep = [r.params.repetition_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    if all(x == 1.0 for x in rep) and not any(pres) and not any(freq):
        return logits
    device = logits.device
    out_counts = torch.zeros(batch, vocab, device=device)
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if r.output_ids:
            ids = torch.tensor(r.output_ids, device=device)
            out_counts[i].index_add_(0, ids, torch.ones(len(ids), device=device))
        if rep[i] != 1.0 and r.prompt_ids:
            seen[i, torch.tensor(r.prompt_ids, device=device)] = True
    seen |= out_counts > 0
    logits = logits.clone()
    rep_t = torch.tensor(rep, device=device, dtype=logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / rep_t, logits * rep_t)
    logits = torch.where(seen, penalised, logits)
    freq_t = torch.tensor(freq, device=device, dtype=logits.dtype)[:, None]
    pres_t = torch.tensor(pres, device=device, dtype=logits.dtype)[:, None]
    return logits - freq_t * out_counts - pres_t * (out_counts > 0)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest per row (k <= 0: keep all); ties at the k-th value are kept."""
    vocab = logits.shape[-1]
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    drop_sorted = (before >= top_p.unsqueeze(-1)) & (top_p < 1.0).unsqueeze(-1)
    drop_sorted[:, 0] = False  # always keep the best token (and all of a top_p 1 row: its
    # float cumsum can reach 1.0 before the tail)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the best token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(-1)
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    """Stateless apart from the fallback generators for unseeded requests (one on the CPU,
    one per device, both from the engine's seed). `eos_token_ids`: the model's end tokens,
    masked for a row under its `min_tokens` (unless it ignores EOS)."""

    def __init__(
        self,
        seed: int | None = None,
        native_argmax: bool = False,
        eos_token_ids: frozenset[int] = frozenset(),
        guides: Guides | None = None,
    ) -> None:
        self.native_argmax = native_argmax  # the device path's C argmax (fp32 CPU logits)
        self.eos_token_ids = eos_token_ids
        self.guides = guides  # the masks of rows with a matcher (constrained output)
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self._device_generators: dict[torch.device, torch.Generator] = {}

    @staticmethod
    def on_device(params: SamplingParams, generator: torch.Generator | None) -> bool:
        """Whether `choose` can sample a row without the host: no penalties (they read the
        token history), no logit_bias or min_tokens (`apply_logit_rules`, which `choose`
        does not apply), no output constraint (its mask is computed on the host from the
        previous token), no logprobs, no request seed (its generator lives on the CPU).
        Overlapped scheduling launches such steps before the previous tokens are known."""
        return (
            params.logprobs is None
            and not params.logit_bias
            and not params.min_tokens
            and params.guided is None
            and params.repetition_penalty == 1.0
            and not params.presence_penalty
            and not params.frequency_penalty
            and (params.temperature == 0.0 or generator is None)
        )

    def __call__(
        self, logits: torch.Tensor, rows: list[SampleRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = apply_logit_rules(logits.float(), rows, self.eos_token_ids)
        logits = apply_penalties(logits, rows)
        tokens = self.choose(self._constrain(logits, rows), rows).tolist()
        return tokens, self._logprobs(logits, tokens, rows)

    def _constrain(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """`logits` with each constrained row's forbidden tokens at -inf (as is without)."""
        indices, matchers = guide_rows([r.guide for r in rows])
        if not indices:
            return logits
        assert self.guides is not None, "a row has a matcher: the engine gave its guides"
        return apply_bitmask(logits, indices, self.guides.bitmask(matchers))

    def choose(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """The next token of every row, left on the logits' device (float32 logits, after
        penalties). No host sync, except for seeded rows on a GPU."""
        chosen = kernels.argmax_rows(logits) if self.native_argmax else None
        if chosen is None:
            chosen = logits.argmax(dim=-1)
        sampled_idx = [i for i, r in enumerate(rows) if r.params.temperature != 0.0]
        if sampled_idx:
            sub_rows = [rows[i] for i in sampled_idx]
            if len(sampled_idx) == len(rows):
                return self._sample(logits, sub_rows)
            index = to_device(sampled_idx, torch.long, logits.device)
            chosen = chosen.index_copy(0, index, self._sample(logits[index], sub_rows))
        return chosen

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        device = logits.device
        temps = to_device([r.params.temperature for r in rows], torch.float32, device)
        logits = logits / temps.unsqueeze(-1)
        if any(r.params.top_k > 0 for r in rows):
            top_k = to_device([r.params.top_k for r in rows], torch.long, device)
            logits = apply_top_k(logits, top_k)
        if any(r.params.top_p < 1.0 for r in rows):
            top_p = to_device([r.params.top_p for r in rows], torch.float32, device)
            logits = apply_top_p(logits, top_p)
        if any(r.params.min_p > 0.0 for r in rows):
            min_p = to_device([r.params.min_p for r in rows], torch.float32, device)
            logits = apply_min_p(logits, min_p)
        probs = logits.softmax(dim=-1)
        # One draw for the whole batch from the engine's generator on the logits' device ...
        out = torch.multinomial(probs, 1, generator=self._generator_for(device))[:, 0]
        for i, r in enumerate(rows):  # ... but a seeded request draws from its own (CPU)
            if r.generator is not None:  # generator: the same tokens whatever shares its batch
                row = probs[i] if device.type == "cpu" else probs[i].cpu()
                out[i] = torch.multinomial(row, 1, generator=r.generator)[0]
        return out

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        if device not in self._device_generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.generator.initial_seed())
            self._device_generators[device] = generator
        return self._device_generators[device]

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: list[int], rows: list[SampleRow]
    ) -> list[TokenLogprob | None]:
        wanted = [r.params.logprobs for r in rows]
        if all(w is None for w in wanted):
            return [None] * len(rows)
        logprobs = logits.log_softmax(dim=-1)
        # Everything to the host in one go (on a GPU each element read would be a sync).
        index = to_device(tokens, torch.long, logprobs.device).unsqueeze(1)
        chosen = logprobs.gather(1, index).squeeze(1).tolist()
        top_n = max(w or 0 for w in wanted)
        top_vals: list[list[float]] = []
        top_ids: list[list[int]] = []
        if top_n:
            top = logprobs.topk(top_n, dim=-1)
            top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        result: list[TokenLogprob | None] = []
        for i, (w, tok) in enumerate(zip(wanted, tokens, strict=True)):
            if w is None:
                result.append(None)
                continue
            entry = TokenLogprob(token_id=tok, logprob=chosen[i])
            if w:
                pairs = zip(top_ids[i][:w], top_vals[i][:w], strict=True)
                entry.top = [TopLogprob(token_id=t, logprob=v) for t, v in pairs]
            result.append(entry)
        return result

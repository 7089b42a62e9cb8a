"""Our decoder vs. HF transformers on tiny random-weight Llama / Qwen2 checkpoints.

Covers every attention path: full prefill, chunked prefill on top of cached KV (bottom-right
causal mask), and batched decode with padding.
"""

from __future__ import annotations

import pytest
import torch

from contract.messages import SamplingParams
from mpi_workers.engine.block_manager import BlockManager
from mpi_workers.engine.scheduler import ScheduledBatch
from mpi_workers.engine.sequence import Sequence
from mpi_workers.engine.torch import kernels
from mpi_workers.engine.torch.kv_cache import KvCache
from mpi_workers.engine.torch.loader import load_model
from mpi_workers.engine.torch.model_config import load_model_config
from mpi_workers.engine.torch.model_runner import ModelRunner, build_plan


def hf_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0]


class Harness:
    """Model + cache + block manager, driving the runner by hand."""

    def __init__(self, model_dir, pack_rows=8, num_blocks=64):
        cfg = load_model_config(model_dir)
        self.model = load_model(model_dir, cfg, 256, pack_rows=pack_rows)
        self.bm = BlockManager(num_blocks, 4)
        self.runner = ModelRunner(self.model, KvCache(cfg, num_blocks, 4, torch.float32, "cpu"))

    def step(self, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
        """Compute `counts` new tokens per sequence; logits of every token, in batch order."""
        for s, n in zip(seqs, counts, strict=True):
            self.bm.allocate(s, s.num_computed + n)
        batch = ScheduledBatch(list(seqs), list(counts))
        with torch.inference_mode():
            ids, pos, meta = self.runner.tensors(build_plan(batch)[0])
            logits = self.model.compute_logits(self.model(ids, pos, meta))
        # build_plan() puts single-token sequences first: undo that ordering.
        order = sorted(range(len(seqs)), key=lambda i: counts[i] > 1)
        starts, offset = {}, 0
        for i in order:
            starts[i] = offset
            offset += counts[i]
        out = [logits[starts[i] : starts[i] + counts[i]] for i in range(len(seqs))]
        for s, n in zip(seqs, counts, strict=True):
            s.num_computed += n
        return out


def new_seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(), max_len=256)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_hf_all_paths(kind, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = tiny_llama_dir if kind == "llama" else tiny_qwen2_dir
    g = torch.Generator().manual_seed(5)
    a_ids = torch.randint(3, 128, (23,), generator=g).tolist()
    b_ids = torch.randint(3, 128, (9,), generator=g).tolist()
    ref_a, ref_b = hf_logits(model_dir, a_ids), hf_logits(model_dir, b_ids)
    h = Harness(model_dir)
    a, b = new_seq(a_ids, "a"), new_seq(b_ids, "b")
    # a: 10-token prefill; b: full 8-token prefill (both without cached prefix).
    la, lb = h.step([a, b], [10, 8])
    torch.testing.assert_close(la, ref_a[:10], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lb, ref_b[:8], atol=1e-4, rtol=1e-4)
    # a: chunk of 11 on top of 10 cached tokens; b: one decode token.
    la, lb = h.step([a, b], [11, 1])
    torch.testing.assert_close(la, ref_a[10:21], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lb, ref_b[8:9], atol=1e-4, rtol=1e-4)
    # batched decode with different context lengths (padding mask).
    (la,) = h.step([a], [1])
    torch.testing.assert_close(la, ref_a[21:22], atol=1e-4, rtol=1e-4)
    c = new_seq(a_ids[:5], "c")
    h.step([c], [4])
    la, lc = h.step([a, c], [1, 1])
    torch.testing.assert_close(la, ref_a[22:23], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lc, ref_a[4:5], atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_matches_hf(tmp_path, tiny_model_writer):
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )
    model_dir = tiny_model_writer(tmp_path, "llama", rope_scaling=scaling, rope_theta=5e5)
    assert load_model_config(model_dir).rope_type == "llama3"
    ids = list(range(3, 60))
    ref = hf_logits(model_dir, ids)
    h = Harness(model_dir)
    (out,) = h.step([new_seq(ids)], [len(ids)])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_unpacked_path_matches_packed(tiny_llama_dir):
    ids = list(range(3, 30))
    outs = []
    for pack in (8, None):
        h = Harness(tiny_llama_dir, pack_rows=pack)
        seqs = [new_seq(ids[: 10 + i], str(i)) for i in range(3)]
        h.step(seqs, [s.num_tokens for s in seqs])
        for s in seqs:
            s.token_ids.append(7)
        outs.append(torch.cat(h.step(seqs, [1, 1, 1])))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_with_index_loads(tmp_path, tiny_model_writer, tiny_llama_dir):
    sharded = tiny_model_writer(tmp_path, "llama", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    cfg = load_model_config(sharded)
    a = load_model(sharded, cfg, 64)
    b = load_model(tiny_llama_dir, load_model_config(tiny_llama_dir), 64)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def _decode_logits(model_dir, mode: str, rows: int = 3) -> torch.Tensor:
    """Logits of three decode steps of `rows` sequences (5, 8, ..., 26 tokens, repeating: the
    4-token blocks' edges are crossed), decoded the `mode` way."""
    h = Harness(model_dir, num_blocks=512)
    assert h.model.model.layers[0].self_attn.head_dim % 16 == 0  # the kernels take it
    if mode == "pytorch":
        h.runner.decode_attention = None
    else:
        assert h.runner.decode_attention is not None
    native = h.model._native_decode
    if mode == "native-layers":
        assert native is not None
        calls = []
        run = native.run
        native.run = lambda *args: calls.append(1) or run(*args)
    else:
        h.model._native_decode = None
    ids = list(range(3, 3 + 5 + 3 * 7))
    seqs = [new_seq(ids[: 5 + 3 * (i % 8)], str(i)) for i in range(rows)]
    h.step(seqs, [s.num_tokens for s in seqs])
    steps = []
    for token in (7, 9, 11):
        for s in seqs:
            s.token_ids.append(token)
        steps.append(torch.cat(h.step(seqs, [1] * rows)))
    if mode == "native-layers":
        assert len(calls) == 3 if rows <= kernels.MAX_ROWS else not calls  # else PyTorch
    return torch.cat(steps)


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler or AVX-512")


@pytest.fixture(scope="module")
def tiny_wide_heads_dir(tmp_path_factory, tiny_model_writer):
    """heads x head_dim (4 x 32) wider than hidden (64), as some Mistral/Qwen configs have."""
    return tiny_model_writer(tmp_path_factory.mktemp("tiny-wide"), "llama", head_dim=32)


@needs_kernels
@pytest.mark.parametrize("kind", ["llama", "qwen2", "wide-heads"])
@pytest.mark.parametrize("mode", ["attention-kernel", "native-layers"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 32, 33])
def test_cpu_kernel_decode_matches_pytorch_path(
    kind, mode, rows, tiny_llama_dir, tiny_qwen2_dir, tiny_wide_heads_dir
):
    """Decode read by our attention kernel, or every layer in one native call, == the
    PyTorch layers with gather + SDPA (qwen2: q/k/v biases); 9 and 32 rows go through the GEMM
    8 rows at a time, 33 rows (past MAX_ROWS) fall back to the PyTorch layers."""
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}.get(kind, tiny_wide_heads_dir)
    expected = _decode_logits(model_dir, "pytorch", rows)
    torch.testing.assert_close(
        _decode_logits(model_dir, mode, rows), expected, atol=1e-5, rtol=1e-5
    )


@needs_kernels
def test_native_decode_declines_metadata_outside_the_cache(tiny_llama_dir):
    """Bad slots, block ids or positions: the kernel refuses before touching anything."""
    h = Harness(tiny_llama_dir)  # 64 blocks of 4 tokens
    native = h.model._native_decode
    assert native is not None
    hidden = torch.randn(2, h.model.config.hidden_size)
    good = dict(
        positions=torch.tensor([5, 9]),
        slots=torch.tensor([5, 13]),
        block_tables=torch.tensor([[0, 1, 2], [2, 3, 4]]),
        lengths=torch.tensor([6, 10]),
    )
    bad_cases = {
        "slots": torch.tensor([5, 64 * 4]),
        "block_tables": torch.tensor([[0, 1, 2], [2, 3, 64]]),
        "positions": torch.tensor([5, 256]),  # the model's RoPE tables hold 256 positions
        "lengths": torch.tensor([6, 13]),  # more than 3 blocks of 4
    }
    for name, value in bad_cases.items():
        before = hidden.clone()
        assert not native.run(before, **{**good, name: value}), name
        assert torch.equal(before, hidden), name
    assert native.run(hidden.clone(), **good)

"""Llama-family decoder (Llama, Qwen2, Mistral) over a flat batch of tokens with a paged KV cache.

`forward(input_ids, positions, meta)` takes every token scheduled this step, whatever
sequence it belongs to; `meta` (attention.AttentionMetadata) says where each token's KV goes
and what it attends to. Logits are computed only for the rows that are sampled
(`compute_logits(hidden, rows)`), which keeps the big vocabulary projection off prefill.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mpi_workers.engine.torch import kernels, triton_ops, triton_row
from mpi_workers.engine.torch.attention import AttentionMetadata, paged_attention
from mpi_workers.engine.torch.device_path import DevicePath
from mpi_workers.engine.torch.device_path import choose as choose_device_path
from mpi_workers.engine.torch.layers import (
    InferenceWeight,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    TpGroup,
    VocabEmbedding,
    _TpLinear,
    apply_rope,
)
from mpi_workers.engine.torch.model_config import ModelConfig

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    """GQA self-attention with fused QKV projection and RoPE."""

    def __init__(self, cfg: ModelConfig, tp: TpGroup) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias, tp
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, False, tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.fused = False  # CUDA: RoPE + K/V cache writes in one Triton kernel (set at load)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), meta))

    def attend(self, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """RoPE, the K/V cache writes and attention over the QKV projection's output
        [tokens, (heads + 2 kv_heads) x head_dim] -> [tokens, heads x head_dim]."""
        tokens = qkv.shape[0]
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = qkv.view(tokens, heads + 2 * kv_heads, self.head_dim)
        if self.fused:  # RoPE and the K/V cache writes in one kernel
            qk = triton_ops.rope_and_cache(qkv, meta.cos, meta.sin, self.k_cache, self.v_cache,
                                           meta.slot_mapping, heads, kv_heads)  # fmt: skip
        else:
            qk = apply_rope(qkv[:, : heads + kv_heads], meta.cos, meta.sin)
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale,
                            cached=self.fused)  # fmt: skip
        return o.reshape(tokens, self.num_heads * self.head_dim)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, cfg: ModelConfig, tp: TpGroup) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [size, size], cfg.mlp_bias, tp
        )
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, cfg.mlp_bias, tp)
        self.split = size // tp.size
        self.fused = False  # CUDA: SiLU·mul in one Triton kernel (set at load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            return self.down_proj(triton_ops.silu_mul(gate_up, self.split))
        return self.down_proj(F.silu(gate_up[:, : self.split]) * gate_up[:, self.split :])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TpGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)


class LlamaForCausalLM(nn.Module):
    """The decoder plus its (possibly tied) vocabulary head; parameter names follow HF."""

    # HF checkpoint name -> (our fused parameter, shard id inside it)
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TpGroup | None = None) -> None:
        super().__init__()
        tp = tp or TpGroup()
        self.config = cfg
        self.tp = tp
        self.model = nn.Module()
        self.model.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self._tied_head: InferenceWeight | None = None
        self._native_decode: kernels.DecodeLayers | None = None  # fp32 CPU decode steps
        self.path = DevicePath("unprepared", weights_as_loaded=True)  # set at load
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms' weights: never a relaid-out or packed weight)."""
        return self.model.norm.weight.dtype

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Point every layer at its slice of the paged cache."""
        for layer, k, v in zip(self.model.layers, k_caches, v_caches, strict=True):
            layer.self_attn.k_cache = k
            layer.self_attn.v_cache = v
        if self._native_decode is not None:
            self._native_decode.bind_kv_cache(k_caches, v_caches)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        input_embeds: torch.Tensor | None = None,
        embeds_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the flat token batch.

        Multimodal hook: rows where `embeds_mask` ([T] bool) is True take the same row of
        `input_embeds` ([T, hidden]: image feature rows in place) instead of the token
        embedding; no data-dependent shapes, so a CUDA graph can hold it.
        """
        h = self.model.embed_tokens(input_ids)
        if input_embeds is not None:
            assert embeds_mask is not None
            h = torch.where(embeds_mask.unsqueeze(1), input_embeds.to(h.dtype), h)
        elif self._native_decode_step(h, positions, meta):
            return self.model.norm(h)
        meta.cos, meta.sin = self.rotary.lookup(positions, h.dtype)
        layer0 = self.model.layers[0].self_attn
        meta.prepare_buffers(layer0.num_kv_heads, layer0.head_dim, h.dtype)
        return self._decoder_layers(h, meta)

    def _decoder_layers(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """All layers and the final norm over the residual stream `h` (updated in place);
        `x` is the normalised input of the next block. Each residual add happens inside the
        norm after it: one Triton kernel on CUDA, an in-place add then the norm elsewhere."""
        layers = self.model.layers
        if self.path.row_linears and h.shape[0] == 1 and self.tp.size == 1:
            return self._one_row_layers(h, meta)
        x = layers[0].input_layernorm(h)
        for index, layer in enumerate(layers):
            x = layer.post_attention_layernorm.add_and_norm(layer.self_attn(x, meta), h)
            after = layers[index + 1].input_layernorm if index + 1 < len(layers) else None
            x = (after or self.model.norm).add_and_norm(layer.mlp(x), h)
        return x

    def _one_row_layers(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """`_decoder_layers` for a step of one token on CUDA: O and down add into the residual
        stream themselves, down computes SiLU·mul as it reads its input (`triton_row`), so
        the norms only normalise: 2 kernels a layer fewer than the many-row path, and no
        split-K reduces."""
        layers = self.model.layers
        x = layers[0].input_layernorm(h)
        for index, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            attended = attn.attend(attn.qkv_proj(x), meta)
            triton_row.row_linear(attended, attn.o_proj.weight, attn.o_proj.bias, residual=h)
            gate_up = mlp.gate_up_proj(layer.post_attention_layernorm(h))
            triton_row.row_linear(
                gate_up, mlp.down_proj.weight, mlp.down_proj.bias, residual=h, glu_input=True
            )
            after = layers[index + 1].input_layernorm if index + 1 < len(layers) else None
            x = (after or self.model.norm)(h)
        return x

    def _native_decode_step(
        self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> bool:
        """A decode-only step of up to `kernels.MAX_ROWS` rows through `kernels.DecodeLayers`
        (all layers in one native call); False: not such a step, the PyTorch layers run."""
        native = self._native_decode
        if (
            native is None
            or meta.num_decode != h.shape[0]
            or h.shape[0] > kernels.MAX_ROWS
            or meta.decode_block_tables is None
            or meta.decode_lens is None
        ):
            return False
        return native.run(
            h, positions, meta.slot_mapping, meta.decode_block_tables, meta.decode_lens
        )

    def prepare_inference(self, path: DevicePath | None = None, pack_rows: int | None = 8) -> None:
        """After loading: take the device path (chosen here from the weights' device and dtype
        unless given), relayout every linear weight (and the vocab head) for it and switch the
        layers to its kernels."""
        if path is None:
            attn = self.model.layers[0].self_attn
            weight = self.model.norm.weight
            path = choose_device_path(
                weight.device, weight.dtype, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                self.tp.size, pack_rows,
            )  # fmt: skip
        self.path = path
        logger.info("device path: %s", path.name)
        with kernels.huge_page_arena():
            for module in self.modules():
                if isinstance(module, _TpLinear):
                    module.prepare_inference(path)
            if self.lm_head is None:
                self._tied_head = InferenceWeight(self.model.embed_tokens.weight.data, path)
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = path.fused_layers
        layers = list(self.model.layers)
        if path.native_decode_layers and kernels.DecodeLayers.supports(layers):
            self._native_decode = kernels.DecodeLayers(
                layers, self.rotary.cos, self.rotary.sin_signed
            )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [rows, vocab]; under TP every rank must call it (a gather), and only rank 0
        gets the logits (the others get None)."""
        if self.lm_head is not None:
            local = self.lm_head(hidden)
        elif self._tied_head is not None:
            local = self._tied_head.matmul(hidden)
        else:
            local = F.linear(hidden, self.model.embed_tokens.weight)
        if self.tp.size == 1:
            return local
        full = self.tp.gather_last_dim(local.contiguous())
        return None if full is None else full[:, : self.config.vocab_size]

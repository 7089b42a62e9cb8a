"""Read a Hugging Face `config.json` (Llama, Qwen2, Mistral) into one typed, validated record.

A LLaVA-family vision-language model (`model_type: llava`) is its decoder's `ModelConfig`
(from `text_config`) with the vision facts in `vision` (`vision.VisionConfig`).

The model, the loader and the KV cache only ever look at `ModelConfig`, so the quirks of the
different HF config spellings (old `rope_theta` + `rope_scaling` vs. transformers 5
`rope_parameters`, eos id lists in `generation_config.json`) are handled here once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpi_workers.engine.torch.vision import VisionConfig

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs to know about a checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    hidden_act: str = "silu"
    vision: VisionConfig | None = None  # a vision-language model's tower and projector
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (theta, scaling) from either the old or the transformers-5 spelling."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else {}
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    return theta, scaling


def parse_model_config(
    raw: dict[str, Any], generation: dict[str, Any] | None = None
) -> ModelConfig:
    """Build a `ModelConfig` from the parsed JSON of config.json (+ generation_config.json)."""
    model_type = raw.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
    if raw.get("sliding_window") and raw.get("use_sliding_window", model_type == "mistral"):
        logger.warning(
            "sliding_window=%s is ignored: full attention is used (exact up to the window)",
            raw["sliding_window"],
        )
    num_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // num_heads
    theta, scaling = _rope_settings(raw)
    eos = _as_id_list(raw.get("eos_token_id"))
    for token_id in _as_id_list((generation or {}).get("eos_token_id")):
        if token_id not in eos:
            eos.append(token_id)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and does not spell it out in its config.
        attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        eos_token_ids=tuple(eos),
        bos_token_id=raw.get("bos_token_id"),
        hidden_act=act,
        extra=raw,
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json` and, when present, `generation_config.json` from an HF folder."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    gen_path = model_dir / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    if raw.get("model_type") == "llava" or "vision_config" in raw:
        return parse_vlm_config(raw, generation)
    return parse_model_config(raw, generation)


def parse_vlm_config(
    raw: dict[str, Any], generation: dict[str, Any] | None = None
) -> ModelConfig:
    """The decoder's `ModelConfig` of a `llava` config.json, with its `vision` facts.

    Older checkpoints spell only what differs from the decoder's defaults in `text_config`
    (llava-1.5: a vocab size and a max length): transformers' own config class fills the
    rest when transformers is installed."""
    from mpi_workers.engine.torch.vision import parse_vision_config

    vision = parse_vision_config(raw)
    text = dict(raw.get("text_config") or {})
    text.setdefault("model_type", "llama")
    try:
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(text["model_type"]).to_dict()
        text = {**defaults, **text}
    except (ImportError, ValueError):
        pass
    if "tie_word_embeddings" not in (raw.get("text_config") or {}):
        text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    cfg = parse_model_config(text, generation)
    if cfg.hidden_size != vision.text_hidden_size:
        raise ValueError(f"text_config.hidden_size {cfg.hidden_size}: the projector outputs "
                         f"{vision.text_hidden_size}")  # fmt: skip
    return dataclasses.replace(cfg, vision=vision, extra=raw)

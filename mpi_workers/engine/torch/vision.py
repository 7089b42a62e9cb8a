"""The image side of a LLaVA-family model: a ViT vision tower (CLIP or SigLIP) and the
multimodal projector, in plain torch.

`VisionEncoder.encode(pixel_values)` returns one image's feature rows [tokens, text hidden]:
exactly what transformers' `LlavaModel.get_image_features` computes (same layers, same
feature selection), and those rows replace the image placeholder tokens' embeddings in the
decoder (`LlamaForCausalLM.forward`'s `input_embeds`). Only the encoder layers up to the
deepest selected one run; the tower's own post-layernorm and pooling head are unused, as in
transformers' feature selection.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CLASS_TOKEN_TOWERS = ("clip_vision_model",)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


# transformers' ACT2FN names of the activations LLaVA towers and projectors use
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str, field: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"{field} {name!r}: supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class VisionConfig:
    """The vision facts of a `llava` config.json (tower, feature selection, projector)."""

    tower: str  # "clip_vision_model" | "siglip_vision_model"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]  # hidden-state indices (0: the embeddings), concatenated
    feature_layer_is_list: bool
    select_strategy: str  # "default" drops the class token, "full" keeps every row
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    image_token_id: int
    tokens_per_image: int  # contract.vlm's count: the frontend places exactly these rows

    @property
    def class_token(self) -> bool:
        return self.tower in CLASS_TOKEN_TOWERS

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_to_run(self) -> int:
        """Encoder layers needed for the deepest selected hidden state."""
        total = self.num_layers + 1
        return max(index % total for index in self.feature_layers)


def parse_vision_config(raw: dict[str, Any]) -> VisionConfig:
    """`VisionConfig` of a `llava` config.json's parsed JSON (ValueError naming the field)."""
    from contract.vlm import vlm_info_from_config

    info = vlm_info_from_config(raw)
    if info is None:
        raise ValueError("model_type: not a vision-language model")
    vision = raw.get("vision_config") or {}
    clip = info.vision_model_type in CLASS_TOKEN_TOWERS
    layer = raw.get("vision_feature_layer", -2)
    layers = tuple(int(i) for i in layer) if isinstance(layer, list) else (int(layer),)
    num_layers = int(vision.get("num_hidden_layers", 24 if clip else 27))
    for index in layers:
        if not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(f"vision_feature_layer {index}: the tower has {num_layers} layers")
    cfg = VisionConfig(
        tower=info.vision_model_type,
        hidden_size=int(vision.get("hidden_size", 1024 if clip else 1152)),
        intermediate_size=int(vision.get("intermediate_size", 4096 if clip else 4304)),
        num_layers=num_layers,
        num_heads=int(vision.get("num_attention_heads", 16)),
        num_channels=int(vision.get("num_channels", 3)),
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 16)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
        hidden_act=str(vision.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh")),
        feature_layers=layers,
        feature_layer_is_list=isinstance(layer, list),
        select_strategy=str(raw.get("vision_feature_select_strategy", "default")),
        projector_act=str(raw.get("projector_hidden_act", "gelu")),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        text_hidden_size=info.hidden_size,
        image_token_id=info.image_token_id,
        tokens_per_image=info.tokens_per_image,
    )
    activation(cfg.hidden_act, "vision_config.hidden_act")
    activation(cfg.projector_act, "projector_hidden_act")
    return cfg


class _Attention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.num_heads, -1).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.out_proj(o.transpose(1, 2).reshape(batch, tokens, dim))


class _Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act, "vision_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _EncoderLayer(nn.Module):
    """Pre-norm transformer block (the same in CLIP and SigLIP)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    """Patch convolution + learned positions; CLIP prepends a class token."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.class_token = cfg.class_token
        dim = cfg.hidden_size
        if self.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, dim, cfg.patch_size, cfg.patch_size, bias=not self.class_token
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + self.class_token, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        if self.class_token:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight


class VisionTower(nn.Module):
    """The ViT; parameter names follow the HF checkpoints (CLIP's `pre_layrnorm` spelling)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        if cfg.class_token:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            _EncoderLayer(cfg) for _ in range(cfg.layers_to_run)
        )

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[embeddings, after layer 1, ...] up to the layers that run (as transformers'
        `hidden_states` of the tower, truncated)."""
        x = self.embeddings(pixel_values)
        if hasattr(self, "pre_layrnorm"):
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states


class Projector(nn.Module):
    """linear_1 → act → linear_2: vision rows into the decoder's embedding space."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width = cfg.hidden_size * len(cfg.feature_layers)
        self.linear_1 = nn.Linear(width, cfg.text_hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text_hidden_size, cfg.text_hidden_size,
                                  bias=cfg.projector_bias)  # fmt: skip
        self.act = activation(cfg.projector_act, "projector_hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionEncoder(nn.Module):
    """Tower + projector: pixel values of images → their feature rows."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionTower(cfg)
        self.multi_modal_projector = Projector(cfg)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features [images, tokens_per_image, text hidden] of pixel values [images, C, H, W]."""
        cfg = self.config
        states = self.vision_tower.hidden_states(pixel_values)
        total = cfg.num_layers + 1
        selected = [states[index % total] for index in cfg.feature_layers]
        if cfg.select_strategy == "default":  # transformers drops the first row (CLS)
            selected = [s[:, 1:] for s in selected]
        features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
        return self.multi_modal_projector(features)


def vision_param_name(name: str) -> str | None:
    """Our `VisionEncoder` name of a checkpoint tensor, None for a tensor of another part.

    Layouts: transformers 5 (`model.vision_tower.*`, `model.multi_modal_projector.*`), the
    original LLaVA one (`vision_tower.*`, `multi_modal_projector.*`), each with or without
    the tower's inner `vision_model.` level."""
    name = name.removeprefix("model.")
    for part in ("vision_tower.", "multi_modal_projector."):
        if name.startswith(part):
            rest = name[len(part) :].removeprefix("vision_model.")
            return part + rest
    return None


def load_vision_encoder(
    model_dir: str | Path, cfg: VisionConfig, device: torch.device, dtype: torch.dtype
) -> VisionEncoder:
    """Build the encoder and fill it from the folder's safetensors (vision + projector
    tensors only; the tower's unused post-layernorm, pooling head and deeper layers skipped)."""
    from safetensors import safe_open

    from mpi_workers.engine.torch.loader import checkpoint_files

    with torch.device("cpu"):
        encoder = VisionEncoder(cfg)
    params = dict(encoder.named_parameters())
    loaded: set[str] = set()
    for path in checkpoint_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                ours = vision_param_name(name)
                if ours is None:
                    continue
                param = params.get(ours)
                if param is None:
                    continue  # post_layernorm, head, layers past the selected one
                tensor = f.get_tensor(name)
                if tensor.shape != param.shape:
                    raise ValueError(f"checkpoint tensor {name!r}: shape {list(tensor.shape)}, "
                                     f"the model wants {list(param.shape)}")  # fmt: skip
                param.data.copy_(tensor)
                loaded.add(ours)
    missing = set(params) - loaded
    if missing:
        raise KeyError(f"checkpoint {model_dir} lacks vision tensors for: {sorted(missing)[:8]}")
    logger.info("vision encoder: %s, %d of %d layers, %d tokens per image", cfg.tower,
                cfg.layers_to_run, cfg.num_layers, cfg.tokens_per_image)  # fmt: skip
    return encoder.to(device=device, dtype=dtype).eval()

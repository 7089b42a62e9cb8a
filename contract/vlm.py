"""What the frontend and the workers must agree on about a vision-language model, read from
its HF folder: the image placeholder token, how many positions one image takes, and the
size of a feature row. `None` for a text-only model.

LLaVA family (`LlavaForConditionalGeneration`): a CLIP or SigLIP vision tower, a projector,
a Llama/Qwen2/Mistral decoder. The processor repeats the image token once per feature row;
CLIP towers emit a class token that the "default" feature strategy drops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_VLM_TYPES = ("llava",)
_CLASS_TOKEN_TOWERS = ("clip_vision_model",)
SUPPORTED_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


@dataclass(frozen=True)
class VlmInfo:
    model_type: str
    vision_model_type: str
    image_token_id: int
    tokens_per_image: int  # placeholder positions (= feature rows) of one image
    hidden_size: int  # the decoder's: a feature row's width


def vlm_info_from_config(raw: dict[str, Any]) -> VlmInfo | None:
    """The VLM facts of a parsed config.json; None for a text-only model. ValueError naming
    the field for a VLM we cannot serve."""
    model_type = raw.get("model_type")
    if "vision_config" not in raw and model_type not in SUPPORTED_VLM_TYPES:
        return None
    if model_type not in SUPPORTED_VLM_TYPES:
        raise ValueError(
            f"model_type {model_type!r}: vision-language models supported: {SUPPORTED_VLM_TYPES}"
        )
    vision = raw.get("vision_config") or {}
    tower = vision.get("model_type", "clip_vision_model")
    if tower not in SUPPORTED_VISION_TOWERS:
        raise ValueError(
            f"vision_config.model_type {tower!r}: supported towers: {SUPPORTED_VISION_TOWERS}"
        )
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r}: 'default' or 'full'")
    patches = (int(vision.get("image_size", 224)) // int(vision.get("patch_size", 16))) ** 2
    class_token = tower in _CLASS_TOKEN_TOWERS
    # LlavaProcessor's count: the class token (CLIP) joins the patches, and the "default"
    # strategy drops the first row whatever the tower (transformers' get_image_features)
    tokens = patches + (1 if class_token else 0) - (1 if strategy == "default" else 0)
    text = raw.get("text_config") or {}
    token_id = raw.get("image_token_index", raw.get("image_token_id"))
    if not isinstance(token_id, int):
        raise ValueError("image_token_index: the model's config names no image token")
    return VlmInfo(
        model_type=str(model_type),
        vision_model_type=str(tower),
        image_token_id=token_id,
        tokens_per_image=tokens,
        hidden_size=int(text.get("hidden_size", 4096)),
    )


def load_vlm_info(model_dir: str | Path) -> VlmInfo | None:
    """`vlm_info_from_config` of a model folder's config.json."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return vlm_info_from_config(raw)

"""TEST DOUBLE: the multimodal inputs of `generate_async`, checked and folded into the prompt.

The real PyTorch flow (`BaseLLM._preprocess`, the model's input processor, e.g.
`LlavaNextInputProcessor`) takes `{"prompt_token_ids", "multi_modal_data": {"image": [PIL,
...]}}` or `{..., "multi_modal_embeddings": {"image": [tensor [rows, hidden], ...]}}` with ONE
image token per image, expands each image token into the image's feature rows (marked with
the out-of-vocabulary id `vocab_size + 1`), and runs the vision tower. The double does the
same expansion (rows per image from `config.json`'s vision tower, or the tensor's rows) and,
instead of a vision tower, folds a digest of the pixels / tensor values into the request: the
fake tokens then depend on the images, so a test can tell that they arrived.

Refused here where the real library would fail too (count of image tokens vs images, a
tensor of the wrong width, a model without a vision tower), and where the real library would
silently do something our adapter must never ask for: images AND embeddings in one request
(the real one drops the embeddings), multimodal input on a generation_only request (the real
one re-runs the vision tower for nothing: the KV already holds the images).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import hashing
from .model_files import ModelInfo

PLACEHOLDER_OFFSET = 1  # image rows are marked with vocab_size + 1 (the real sentinel)


@dataclass(frozen=True, slots=True)
class ExpandedPrompt:
    token_ids: list[int]
    digest: int  # of every image's pixels / embedding's values, in order
    placeholder: int


def expand(
    inputs: Mapping[str, Any], token_ids: list[int], info: ModelInfo
) -> ExpandedPrompt | None:
    """The prompt as the context phase runs it, or None for a text-only request."""
    data, embeds = inputs.get("multi_modal_data"), inputs.get("multi_modal_embeddings")
    if data is None and embeds is None:
        return None
    if data is not None and embeds is not None:
        raise ValueError(
            "multi_modal_data and multi_modal_embeddings in one request: the real LLM would "
            "use the images and silently drop the embeddings (TensorRT-LLM test double)"
        )
    if info.image_token_id is None or info.hidden_size is None:
        raise ValueError(
            f"{info.path} is not a multimodal model (no vision_config / image_token_index "
            "in config.json)"
        )
    key, value = (
        ("multi_modal_data", data) if data is not None else ("multi_modal_embeddings", embeds)
    )
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must be a dict of modality -> list, got {type(value).__name__}")
    if set(value) != {"image"}:
        raise ValueError(f"{key}: only the image modality is supported, got {sorted(value)}")
    items = value["image"]
    if not isinstance(items, list) or not items:
        raise TypeError(f"{key}['image'] must be a non-empty list")
    rows = [
        _image_rows(item, info) if key == "multi_modal_data" else _tensor_rows(item, info)
        for item in items
    ]
    if token_ids.count(info.image_token_id) != len(items):
        raise ValueError(
            f"Number of images ({len(items)}) must match the number of image tokens "
            f"({info.image_token_id}) in prompt_token_ids ({token_ids.count(info.image_token_id)})"
        )
    placeholder = info.vocab_size + PLACEHOLDER_OFFSET
    expanded: list[int] = []
    image = 0
    for token in token_ids:
        if token == info.image_token_id:
            expanded.extend([placeholder] * rows[image])
            image += 1
        else:
            expanded.append(token)
    digest = hashing.absorb(hashing.mix64(len(items)), (_digest(item) for item in items))
    return ExpandedPrompt(expanded, digest, placeholder)


def _image_rows(item: Any, info: ModelInfo) -> int:
    from PIL import Image

    if not isinstance(item, Image.Image):
        raise TypeError(
            f"multi_modal_data['image'] items must be PIL images, got {type(item).__name__}"
        )
    assert info.image_tokens is not None
    return info.image_tokens


def _tensor_rows(item: Any, info: ModelInfo) -> int:
    import torch

    if not isinstance(item, torch.Tensor) or item.dim() != 2 or not item.is_floating_point():
        raise TypeError(
            "multi_modal_embeddings['image'] items must be 2-D float tensors [rows, hidden]"
        )
    if item.shape[1] != info.hidden_size:
        raise ValueError(
            f"Multimodal embedding_dim ({item.shape[1]}) must match model hidden_size "
            f"({info.hidden_size})"
        )
    return int(item.shape[0])


def _digest(item: Any) -> int:
    digest = hashlib.blake2b(digest_size=8)
    if hasattr(item, "tobytes") and hasattr(item, "mode"):  # a PIL image
        digest.update(f"{item.mode}{item.size}".encode())
        digest.update(item.tobytes())
    else:  # a tensor: its dtype, shape and raw values
        digest.update(f"{item.dtype}{tuple(item.shape)}".encode())
        digest.update(
            item.detach()
            .cpu()
            .contiguous()
            .reshape(-1)
            .view(__import__("torch").uint8)
            .numpy()
            .tobytes()
        )
    return int.from_bytes(digest.digest(), "little")


def salted(salt_id: int | None, digest: int) -> int:
    """The KV salt of a multimodal request: its blocks are never shared with other images'
    (the real cache keys blocks by the image hashes; the double salts the whole chain)."""
    return hashing.mix64((salt_id or 0) ^ digest)

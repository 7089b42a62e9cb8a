"""What the double reads from a Hugging Face model folder: sizes, end ids, a light tokenizer.

Why: the real LLM loads weights and a transformers tokenizer; the double needs only the
vocabulary size (to keep token ids in range), the model's context length, the end-of-sequence
id (SamplingParams._setup) and, when asked to, text <-> ids through the `tokenizers` package
(never transformers: it is slow to import and not a dependency here).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@dataclass(frozen=True)
class ModelInfo:
    """The few facts of a model folder the double uses."""

    path: Path
    vocab_size: int
    max_position_embeddings: int | None
    eos_ids: tuple[int, ...]
    tokenizer_eos_id: int | None
    tokenizer_pad_id: int | None
    has_tokenizer_file: bool = field(default=False)
    # A vision-language model (LLaVA layout): the image token, rows per image, row width.
    image_token_id: int | None = None
    image_tokens: int | None = None
    hidden_size: int | None = None


def load_model_info(model: Path) -> ModelInfo:
    """Read config.json (+ generation/tokenizer configs). Raises ValueError when unusable."""
    config = _read_json(model / "config.json")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    vocab = config.get("vocab_size") or text_config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise ValueError(f"{model / 'config.json'} has no usable vocab_size")
    max_pos = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
    generation = _read_json(model / "generation_config.json")
    eos: list[int] = []
    for source in (generation.get("eos_token_id"), config.get("eos_token_id")):
        eos += [i for i in _ids(source) if i not in eos]
    tok_eos, tok_pad = _tokenizer_special_ids(model)
    if tok_eos is not None and tok_eos not in eos:
        eos.insert(0, tok_eos)
    return ModelInfo(
        path=model,
        vocab_size=vocab,
        max_position_embeddings=max_pos if isinstance(max_pos, int) else None,
        eos_ids=tuple(i for i in eos if 0 <= i < vocab),
        tokenizer_eos_id=tok_eos if tok_eos is not None else (eos[0] if eos else None),
        tokenizer_pad_id=tok_pad,
        has_tokenizer_file=(model / "tokenizer.json").is_file(),
        **_vision_facts(config, text_config),
    )


def _vision_facts(config: dict[str, Any], text_config: dict[str, Any]) -> dict[str, Any]:
    """Image token, rows per image ((image_size / patch_size)^2, + the CLIP class token
    under the "full" feature strategy) and hidden size, for a folder with a vision tower."""
    vision = config.get("vision_config")
    token = config.get("image_token_index", config.get("image_token_id"))
    if not isinstance(vision, dict) or not isinstance(token, int):
        return {}
    patches = (int(vision.get("image_size", 224)) // int(vision.get("patch_size", 16))) ** 2
    clip_full = vision.get("model_type", "clip_vision_model") == "clip_vision_model" and (
        config.get("vision_feature_select_strategy", "default") == "full"
    )
    hidden = text_config.get("hidden_size", config.get("hidden_size"))
    return {
        "image_token_id": token,
        "image_tokens": patches + (1 if clip_full else 0),
        "hidden_size": int(hidden) if isinstance(hidden, int) else None,
    }


def _tokenizer_special_ids(model: Path) -> tuple[int | None, int | None]:
    """eos/pad ids as the tokenizer would report them (tokenizer_config names -> ids)."""
    tok_config = _read_json(model / "tokenizer_config.json")
    names = {
        "eos": _token_text(tok_config.get("eos_token")),
        "pad": _token_text(tok_config.get("pad_token")),
    }
    if not any(names.values()):
        return None, None
    lookup: dict[str, int] = {}
    for key, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is not None and str(key).isdigit():
            lookup[text] = int(key)
    missing = [n for n in names.values() if n and n not in lookup]
    if missing:
        tokenizer = _read_json(model / "tokenizer.json")
        for entry in tokenizer.get("added_tokens") or []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), int):
                lookup.setdefault(str(entry.get("content")), entry["id"])
        vocab = (tokenizer.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            for name in missing:
                if isinstance(vocab.get(name), int):
                    lookup.setdefault(name, vocab[name])
    eos = lookup.get(names["eos"]) if names["eos"] else None
    pad = lookup.get(names["pad"]) if names["pad"] else None
    return eos, pad


@lru_cache(maxsize=8)
def _load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer  # lazy: only when text is needed

    return Tokenizer.from_file(path)


class LightTokenizer:
    """The tokenizer surface the LLM API touches: eos/pad ids, encode, decode.

    Loads `tokenizer.json` lazily (first encode/decode) with the `tokenizers` package.
    """

    def __init__(self, info: ModelInfo) -> None:
        self._info = info
        self._lock = threading.Lock()
        self.eos_token_id: int | None = info.tokenizer_eos_id
        self.pad_token_id: int | None = info.tokenizer_pad_id

    def _backend(self) -> Any:
        if not self._info.has_tokenizer_file:
            raise ValueError(
                f"the TensorRT-LLM test double needs {self._info.path / 'tokenizer.json'} "
                "(and the `tokenizers` package) to handle text; pass token ids instead"
            )
        with self._lock:
            return _load_tokenizer(str(self._info.path / "tokenizer.json"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend().encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._backend().decode(list(token_ids), skip_special_tokens=skip_special_tokens))

"""`ModelShape`: what engines without our model code (mocker, TensorRT-LLM) read from a model
folder's `config.json`: vocabulary size, context length, EOS ids. No weights needed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VOCAB_SIZE = 32000
DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_HIDDEN_SIZE = 4096


@dataclass
class ModelShape:
    """What the mocker takes from a model folder: vocabulary, context length, EOS ids, and
    the hidden size (its simulated embeddings' length)."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    max_position_embeddings: int = DEFAULT_MAX_MODEL_LEN
    eos_token_ids: tuple[int, ...] = ()
    hidden_size: int = DEFAULT_HIDDEN_SIZE

    @classmethod
    def from_folder(cls, model_dir: str | Path | None) -> ModelShape:
        """Read `config.json` when there is one; defaults otherwise (no weights needed)."""
        path = Path(model_dir) / "config.json" if model_dir else None
        if path is None or not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        # A vision-language folder (LLaVA) keeps the decoder's sizes under `text_config`.
        text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
        data = {**text, **{k: v for k, v in data.items() if v is not None}}
        eos = data.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=int(data.get("vocab_size", DEFAULT_VOCAB_SIZE)),
            max_position_embeddings=int(data.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN)),
            eos_token_ids=tuple(int(t) for t in eos_ids),
            hidden_size=int(data.get("hidden_size", DEFAULT_HIDDEN_SIZE)),
        )

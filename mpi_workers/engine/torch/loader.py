"""Load HF safetensors checkpoints (single file or sharded with an index) into the model.

Checkpoint names are mapped onto our fused parameters through the model's
`packed_modules`, and every tensor goes through its parameter's `weight_loader`, so a
tensor-parallel rank would copy only its shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from mpi_workers.engine.torch.layers import RotaryEmbedding, TpGroup, materialize
from mpi_workers.engine.torch.model import LlamaForCausalLM
from mpi_workers.engine.torch.model_config import ModelConfig

logger = logging.getLogger(__name__)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU (exact, and CPU bf16 matmuls are slow); bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def _default_loader(param: nn.Parameter, loaded: object, shard_id: object = None) -> None:
    param.data.copy_(materialize(loaded))


def decoder_param_name(name: str) -> str | None:
    """A vision-language checkpoint's decoder tensor under the text model's name (None: a
    vision tower or projector tensor). transformers 5 spells `model.language_model.X` and
    `lm_head.X`; the original LLaVA layout `language_model.model.X` and
    `language_model.lm_head.X`."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    if name.startswith("lm_head."):
        return name
    return None


def load_weights(model: LlamaForCausalLM, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into `model`; complain about missing or unknown ones.

    Tensors are handed to the weight loaders as lazy slices, so a TP rank reads only its shard.
    A vision-language checkpoint's decoder tensors are renamed (`decoder_param_name`) and its
    vision tensors left to `vision.load_vision_encoder`.
    """
    from safetensors import safe_open  # lazy: the GPU benchmark runs without safetensors

    model_dir = Path(model_dir)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    vlm = model.config.vision is not None
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for stored in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = decoder_param_name(stored) if vlm else stored
                if name is None or "rotary_emb.inv_freq" in name:
                    continue
                if name == "lm_head.weight" and model.lm_head is None:
                    continue  # tied: some checkpoints still store a copy
                target, shard_id = name, None
                for hf_name, (ours, shard) in model.packed_modules.items():
                    if f".{hf_name}." in name:
                        target, shard_id = name.replace(f".{hf_name}.", f".{ours}."), shard
                        break
                param = params.get(target)
                if param is None:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
                loader = getattr(param, "weight_loader", _default_loader)
                loader(param, f.get_slice(stored), shard_id)
                loaded.add(target)
    missing = set(params) - loaded
    if missing:
        raise KeyError(f"checkpoint {model_dir} lacks tensors for: {sorted(missing)[:8]}")
    logger.info("loaded %d tensors from %s", len(loaded), model_dir)


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    max_positions: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    pack_rows: int | None = 8,
    tp: TpGroup | None = None,
) -> LlamaForCausalLM:
    """Build the model (this rank's shard under `tp`) on `device` in `dtype`, fill it from
    `model_dir`."""
    dtype = dtype or default_dtype(device)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg, max_positions, tp)
    load_weights(model, model_dir)
    model = model.to(device=device, dtype=dtype)
    # RoPE tables are rebuilt in float32 (the cast above would round them); lookup casts.
    model.rotary = RotaryEmbedding(
        cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling
    ).to(device)
    model.prepare_inference(pack_rows=pack_rows)
    return model.eval()

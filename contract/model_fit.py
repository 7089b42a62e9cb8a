"""Does a model fit the tensor-parallel layout the config asks for? Read from the model's
config.json before anything loads, by `hpcserve up` (so a bad tp fails before processes start)
and by every worker rank (a config started some other way)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contract.config import ConfigError, DeploymentConfig


def check_tp_fits(raw: dict[str, Any], tp: int, field: str) -> None:
    """ConfigError naming `field` when `tp` cannot shard a model of HF config `raw`."""
    if tp == 1:
        return
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    inter = int(raw["intermediate_size"])
    problems = []
    if heads % tp:
        problems.append(f"{heads} attention heads")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"{kv_heads} KV heads (nor is tp a multiple of them)")
    if inter % tp:
        problems.append(f"intermediate size {inter}")
    if problems:
        raise ConfigError(f"{field}: tp {tp} does not divide the model's " + ", ".join(problems))


def check_model_tp(model_dir: str | Path, config: DeploymentConfig) -> None:
    """Check every worker group's tp against the model's config.json (before any load)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return
    raw = json.loads(path.read_text())
    for number, group in enumerate(config.workers):
        check_tp_fits(raw, group.tp, f"workers.{number}.tp")

"""The tensor-parallel fit check, read from the model's config.json before anything loads."""

from __future__ import annotations

import json

import pytest

from contract.config import ConfigError, load_config
from contract.model_fit import check_model_tp, check_tp_fits

SMOL = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}


def test_tp_must_divide_heads() -> None:
    check_tp_fits(SMOL, 3, "workers.0.tp")
    check_tp_fits(SMOL, 1, "workers.0.tp")
    with pytest.raises(ConfigError, match=r"workers\.1\.tp: tp 2 does not divide .*9 attention"):
        check_tp_fits(SMOL, 2, "workers.1.tp")
    # 8 heads, 2 KV heads: tp 4 replicates each KV head on 2 ranks; tp 8 too; 3 fails.
    raw = {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 64}
    check_tp_fits(raw, 4, "w")
    raw6 = {"num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 48}
    with pytest.raises(ConfigError, match="4 KV heads"):
        check_tp_fits(raw6, 6, "w")


def test_model_dir_check_names_the_failing_group(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    check_model_tp(tmp_path, load_config(None, ["workers=[{tp: 1}, {tp: 3}]"], environ={}))
    with pytest.raises(ConfigError, match=r"workers\.1\.tp: tp 2 does not divide"):
        check_model_tp(tmp_path, load_config(None, ["workers=[{tp: 3}, {tp: 2}]"], environ={}))


def test_model_dir_without_config_is_left_to_the_loader(tmp_path) -> None:
    check_model_tp(tmp_path, load_config(None, ["workers=[{tp: 2}]"], environ={}))

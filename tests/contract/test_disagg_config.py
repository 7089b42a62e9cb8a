"""Disaggregation settings: roles, strategy default and its env override, serving roles."""

from __future__ import annotations

import pytest

from contract.config import ConfigError, load_config
from contract.disagg import serving_roles


def _load(*overrides: str, environ: dict[str, str] | None = None):
    sets = ["workers=[{role: prefill}, {role: decode}]", *overrides]
    return load_config(None, sets, environ=environ or {})


def test_prefill_and_decode_together_default_to_decode_first_over_ucx() -> None:
    config = _load()
    assert [g.role for g in config.workers] == ["prefill", "decode"]
    assert config.disaggregation.strategy == "decode_first"
    assert config.disaggregation.kv_transfer == "ucx"
    assert config.disaggregation.fallback_local_prefill is False


def test_kv_router_defaults_to_prefill_first_unless_set() -> None:
    assert _load("frontend.router=kv").disaggregation.strategy == "prefill_first"
    explicit = _load("frontend.router=kv", "disaggregation.strategy=decode_first")
    assert explicit.disaggregation.strategy == "decode_first"


def test_env_overrides_the_strategy_and_set_wins_over_env() -> None:
    env = {"DISAGGREGATION_STRATEGY": "prefill_first"}
    assert _load(environ=env).disaggregation.strategy == "prefill_first"
    config = load_config("configs/local-disagg.yaml", environ=env)
    assert config.disaggregation.strategy == "prefill_first"
    assert _load("disaggregation.strategy=decode_first", environ=env).disaggregation.strategy == (
        "decode_first"
    )
    with pytest.raises(ConfigError, match=r"disaggregation\.strategy"):
        _load(environ={"DISAGGREGATION_STRATEGY": "sideways"})


def test_roles_must_come_in_pairs_or_with_fallback() -> None:
    with pytest.raises(ConfigError, match=r"workers\.0\.role: decode workers need a prefill"):
        load_config(None, ["workers.0.role=decode"], environ={})
    with pytest.raises(ConfigError, match=r"prefill workers need a decode"):
        load_config(None, ["workers.0.role=prefill"], environ={})
    alone = load_config(
        None, ["workers.0.role=decode", "disaggregation.fallback_local_prefill=true"], environ={}
    )
    assert alone.workers[0].role == "decode"
    with pytest.raises(ConfigError, match="prefill_first needs a prefill"):
        load_config(
            None,
            ["workers.0.role=decode", "disaggregation.fallback_local_prefill=true",
             "disaggregation.strategy=prefill_first"],
            environ={},
        )  # fmt: skip


def test_disaggregation_needs_a_real_kv_cache_and_tp_may_differ() -> None:
    with pytest.raises(ConfigError, match=r"engine\.kind torch or trtllm"):
        _load("engine.kind=mocker")
    assert [g.tp for g in _load("workers.1.tp=3").workers] == [1, 3]
    assert [g.tp for g in _load("workers.0.tp=3").workers] == [3, 1]
    tp3 = load_config("configs/local-disagg-tp3.yaml", environ={})
    assert [(g.role, g.tp) for g in tp3.workers] == [("prefill", 1), ("decode", 3)]
    with pytest.raises(ConfigError, match="kv_transfer"):
        _load("disaggregation.kv_transfer=carrier_pigeon")


def test_agg_configs_are_unchanged_and_frontend_entry_roles() -> None:
    assert load_config("configs/local-agg.yaml", environ={}).workers[0].role == "agg"
    assert serving_roles("decode_first") == ("agg", "decode")
    assert serving_roles("prefill_first") == ("agg", "prefill")

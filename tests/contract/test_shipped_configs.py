"""Every shipped deployment config loads, and every TensorRT-LLM engine YAML it names exists,
says what it is for, and is accepted by TensorRT-LLM's argument check (the test double's,
`tests/trtllm_double`, which mirrors the LLM API of TensorRT-LLM 1.2-1.3)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from contract.config import DeploymentConfig, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
ENGINE_YAMLS = sorted((REPO / "configs" / "engine_configs").rglob("*.yaml"))
DOUBLE = REPO / "tests" / "trtllm_double"


def engine_yamls_of(config: DeploymentConfig) -> list[str]:
    named = [config.engine.trtllm.extra_engine_args]
    named += [group.engine_args for group in config.workers]
    return [path for path in named if path]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path: Path) -> None:
    config = load_config(path, environ={})
    for engine_yaml in engine_yamls_of(config):
        assert Path(engine_yaml).is_absolute() and Path(engine_yaml).is_file(), engine_yaml
        assert Path(engine_yaml).parent.is_relative_to(REPO / "configs" / "engine_configs")


def test_every_engine_yaml_is_used_or_an_alternative() -> None:
    used = {Path(p) for path in CONFIGS for p in engine_yamls_of(load_config(path, environ={}))}
    alternatives = {"prefill-nixl.yaml", "decode-nixl.yaml", "eagle_agg.yaml"}
    assert {p for p in ENGINE_YAMLS if p.name not in alternatives} <= used


@pytest.mark.parametrize("path", ENGINE_YAMLS, ids=[p.name for p in ENGINE_YAMLS])
def test_engine_yaml_says_what_it_is_for(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("# "), f"{path} must start with a comment saying what it is for"
    data = yaml.safe_load(text)
    assert isinstance(data, dict) and data
    # Parallelism comes from the deployment config (workers.N.tp, engine.trtllm.*).
    assert not {"tensor_parallel_size", "pipeline_parallel_size"} & set(data)


def test_group_engine_args_anchor_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "deploy.yaml"
    path.write_text(
        "engine:\n  kind: trtllm\n  trtllm: {extra_engine_args: e/agg.yaml}\n"
        "workers:\n  - {role: prefill, engine_args: e/p.yaml}\n"
        "  - {role: decode, engine_args: /abs/d.yaml}\n"
    )
    config = load_config(path, environ={})
    assert config.engine.trtllm.extra_engine_args == str(tmp_path / "sub" / "e" / "agg.yaml")
    assert [g.engine_args for g in config.workers] == [
        str(tmp_path / "sub" / "e" / "p.yaml"),
        "/abs/d.yaml",
    ]
    assert load_config(environ={}).workers[0].engine_args is None


@pytest.fixture(scope="module")
def double() -> Iterator[Any]:
    """The test double's `tensorrt_llm` (skips when it is not there yet)."""
    if not (DOUBLE / "tensorrt_llm" / "__init__.py").is_file():
        pytest.skip("tests/trtllm_double/tensorrt_llm (the TensorRT-LLM test double) is missing")
    saved = list(sys.path)
    sys.path.insert(0, str(DOUBLE))
    try:
        module = importlib.import_module("tensorrt_llm")
        assert module._IS_TEST_DOUBLE
        yield module
    finally:
        sys.path[:] = saved
        for name in [
            n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")
        ]:
            del sys.modules[name]


@pytest.mark.parametrize("path", ENGINE_YAMLS, ids=[p.name for p in ENGINE_YAMLS])
def test_engine_yaml_passes_the_llm_api_check(double: Any, path: Path, model_dir: Path) -> None:
    """What the adapter does with a YAML: merge it over its own arguments with
    `update_llm_args_with_extra_options`, then `LLM(**args)` (strict: an unknown or misspelt
    key, or a bad nested value, raises)."""
    from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_options

    base = {
        "model": str(model_dir),
        "tensor_parallel_size": 1,
        "backend": "pytorch",
        "kv_cache_config": {"free_gpu_memory_fraction": 0.5, "tokens_per_block": 16},
    }
    args = update_llm_args_with_extra_options(dict(base), str(path))
    llm = double.LLM(**args)
    try:
        kv = llm.args.kv_cache_config
        assert kv.enable_block_reuse and kv.event_buffer_max_size > 0  # the KV router's needs
        assert kv.tokens_per_block == 16  # the base's kv_cache_config keys survive the YAML
    finally:
        llm.shutdown()


def test_a_stale_key_is_rejected(double: Any, model_dir: Path, tmp_path: Path) -> None:
    """The check has teeth: pre-1.0 `cuda_graph_padding_enabled` is refused."""
    from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_options

    stale = tmp_path / "stale.yaml"
    stale.write_text("cuda_graph_padding_enabled: true\n")
    with pytest.raises(ValueError, match="cuda_graph_padding_enabled"):
        args = update_llm_args_with_extra_options({"model": str(model_dir)}, str(stale))
        double.LLM(**args)

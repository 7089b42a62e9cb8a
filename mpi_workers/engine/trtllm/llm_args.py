"""The keyword arguments of `tensorrt_llm.LLM` for one worker group, from our config.

Three layers, each overriding the one before (as Dynamo's TensorRT-LLM worker does):
1. our config: `engine.trtllm` fields, the group's `tp`, `engine.block_size` as the KV
   block size (the router hashes blocks of that size), KV block reuse and the KV event
   buffer on (the router needs them), iteration stats on (load metrics);
2. the engine YAML (`workers.N.engine_args` or `engine.trtllm.extra_engine_args`), applied
   with TensorRT-LLM's own `update_llm_args_with_extra_options`;
3. `engine.trtllm.override_engine_args`, deep-merged.
Unknown keys are rejected by `LLM` itself (ValueError naming the key) when the engine starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contract.config import ConfigError, DeploymentConfig, WorkerGroupConfig

KV_CACHE_CONFIG = "kv_cache_config"


def engine_yaml(config: DeploymentConfig, group: WorkerGroupConfig) -> str | None:
    """The group's TensorRT-LLM YAML, if any (the group's own wins)."""
    return group.engine_args or config.engine.trtllm.extra_engine_args


def yaml_field(config: DeploymentConfig, group: WorkerGroupConfig) -> str:
    """The config field that named the group's engine YAML (for error messages)."""
    if group.engine_args:
        index = next(i for i, g in enumerate(config.workers) if g is group)
        return f"workers.{index}.engine_args"
    return "engine.trtllm.extra_engine_args"


def base_args(config: DeploymentConfig, group: WorkerGroupConfig, model_path: Path) -> dict:
    """Layer 1: what our config says, in the LLM API's own names."""
    t = config.engine.trtllm
    model = t.model or str(model_path)
    args: dict[str, Any] = {
        "model": model,
        "tokenizer": t.tokenizer or model,
        "tensor_parallel_size": group.tp,
        "pipeline_parallel_size": t.pipeline_parallel_size,
        "backend": "pytorch",
        "enable_iter_perf_stats": True,
        KV_CACHE_CONFIG: {
            "free_gpu_memory_fraction": t.free_gpu_memory_fraction,
            "enable_block_reuse": t.enable_block_reuse,
            "event_buffer_max_size": t.event_buffer_max_size,
            "tokens_per_block": config.engine.block_size,
        },
    }
    optional = {
        "moe_expert_parallel_size": t.moe_expert_parallel_size,
        "gpus_per_node": t.gpus_per_node,
        "max_batch_size": t.max_batch_size,
        "max_num_tokens": t.max_num_tokens,
        "max_seq_len": t.max_seq_len or config.engine.max_model_len,
        "guided_decoding_backend": t.guided_decoding_backend,
    }
    args.update({key: value for key, value in optional.items() if value is not None})
    if t.enable_attention_dp:
        args["enable_attention_dp"] = True
    return args


def build_llm_args(
    config: DeploymentConfig, group: WorkerGroupConfig, model_path: Path
) -> dict[str, Any]:
    """All three layers merged; `kv_cache_config` ends as a plain dict holding our keys
    unless the YAML or the overrides set them."""
    args = base_args(config, group, model_path)
    ours = dict(args[KV_CACHE_CONFIG])
    yaml_path = engine_yaml(config, group)
    if yaml_path:
        if not Path(yaml_path).is_file():
            raise ConfigError(f"{yaml_field(config, group)}: no such file {yaml_path}")
        from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_options

        try:
            args = update_llm_args_with_extra_options(args, yaml_path)
        except (ValueError, TypeError) as exc:  # pydantic errors are ValueErrors
            raise ConfigError(f"{yaml_field(config, group)} ({yaml_path}): {exc}") from exc
        args[KV_CACHE_CONFIG] = {**ours, **as_dict(args[KV_CACHE_CONFIG])}
    deep_update(args, config.engine.trtllm.override_engine_args)
    return args


def as_dict(value: Any) -> dict[str, Any]:
    """A nested LLM API config (pydantic model, dataclass or dict) as the keys that were set."""
    if isinstance(value, Mapping):
        return dict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(exclude_unset=True)
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot merge into {type(value).__name__}")


def deep_update(target: dict[str, Any], source: Mapping[str, Any]) -> None:
    """Recursively merge `source` into `target` (a nested config object becomes a dict)."""
    for key, value in source.items():
        if isinstance(value, Mapping) and key in target and target[key] is not None:
            merged = as_dict(target[key])
            deep_update(merged, value)
            target[key] = merged
        else:
            target[key] = value


def tokens_per_block(args: Mapping[str, Any]) -> int | None:
    """The KV block size the merged args give the engine (None: the library's default)."""
    return as_dict(args.get(KV_CACHE_CONFIG) or {}).get("tokens_per_block")

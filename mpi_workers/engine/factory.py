"""`build_engine(config, model_dir)`: the engine `config.engine.kind` names, configured.

Engines are imported lazily so that a mocker worker never pays for importing torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.config import ConfigError, DeploymentConfig
from contract.plan import cpu_threads_per_rank, worker_ranks_here
from mpi_workers.engine.base import Engine

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mpi_workers.engine.torch.tp import TpRuntime


def torch_placement(config: DeploymentConfig, tp: TpRuntime | None = None) -> tuple[Any, Any]:
    """(device, dtype or None for the device's default) from `config.engine`; under TP the
    device is the rank's own (its GPU by local rank)."""
    import torch

    engine_config = config.engine
    if engine_config.torch_threads:
        torch.set_num_threads(engine_config.torch_threads)
    device = engine_config.device
    if tp is not None:
        device = tp.device
    elif device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not engine_config.torch_threads and tp is None and str(device) == "cpu":
        ranks_here = worker_ranks_here()  # TP ranks took their share at start-up
        if ranks_here is not None:
            torch.set_num_threads(cpu_threads_per_rank(os.cpu_count() or 1, ranks_here))
    dtype = None if engine_config.dtype == "auto" else getattr(torch, engine_config.dtype)
    return device, dtype


def build_torch_engine(
    config: DeploymentConfig, model_path: Path, tp: TpRuntime | None = None
) -> Engine:
    """The built-in PyTorch engine, configured from `config.engine` (a TP leader with `tp`)."""
    from mpi_workers.engine.torch.engine import TorchEngine

    engine_config = config.engine
    device, dtype = torch_placement(config, tp)
    return TorchEngine(
        model_dir=model_path,
        device=device,
        dtype=dtype,
        block_size=engine_config.block_size,
        num_blocks=engine_config.num_blocks,
        kv_cache_memory_bytes=(
            engine_config.kv_cache_memory_mb * 2**20 if engine_config.kv_cache_memory_mb else None
        ),
        gpu_memory_utilization=engine_config.gpu_memory_utilization,
        max_num_seqs=engine_config.max_num_seqs,
        max_num_batched_tokens=engine_config.max_num_batched_tokens,
        max_model_len=engine_config.max_model_len,
        model_name=config.model.served_model_name(),
        tp=tp,
        max_image_pixels=config.multimodal.max_image_pixels,
    )


def build_mocker_engine(config: DeploymentConfig, model_path: Path | None) -> Engine:
    """The simulated engine; the model folder (if any) only gives vocab size and max length."""
    from mpi_workers.engine.mocker import MockerEngine, ModelShape

    engine_config = config.engine
    return MockerEngine(
        engine_config.mocker,
        model_name=config.model.served_model_name(),
        shape=ModelShape.from_folder(model_path),
        block_size=engine_config.block_size,
        num_blocks=engine_config.num_blocks,
        max_num_seqs=engine_config.max_num_seqs,
        max_num_batched_tokens=engine_config.max_num_batched_tokens,
        max_model_len=engine_config.max_model_len,
    )


def build_trtllm_engine(config: DeploymentConfig, model_path: Path, group: int) -> Engine:
    """The TensorRT-LLM adapter for worker group `group` (its `tp`, its engine YAML).
    Raises ConfigError naming the field when the merged args cannot work with our router."""
    from mpi_workers.engine.model_shape import ModelShape
    from mpi_workers.engine.trtllm.engine import TrtllmEngine
    from mpi_workers.engine.trtllm.llm_args import build_llm_args, tokens_per_block

    spec = config.workers[group]
    args = build_llm_args(config, spec, model_path)
    block_size = tokens_per_block(args) or config.engine.block_size
    if block_size != config.engine.block_size:
        raise ConfigError(
            f"engine.block_size: {config.engine.block_size}, but the engine YAML sets "
            f"kv_cache_config.tokens_per_block {block_size}; the KV router hashes blocks of "
            "engine.block_size tokens: make them equal"
        )
    shape = ModelShape.from_folder(args.get("tokenizer") or args["model"])
    max_len = args.get("max_seq_len") or shape.max_position_embeddings
    kv = args["kv_cache_config"]
    events = bool(kv.get("event_buffer_max_size")) and kv.get("enable_block_reuse", True)
    logger.info(
        "TensorRT-LLM engine: model %s, tp %d, pp %d, KV events %s",
        args["model"], args.get("tensor_parallel_size", 1),
        args.get("pipeline_parallel_size", 1), "on" if events else "off",
    )  # fmt: skip
    return TrtllmEngine(
        args,
        model_name=config.model.served_model_name(),
        shape=shape,
        block_size=block_size,
        max_model_len=int(max_len),
        kv_events=events,
    )


def build_engine(config: DeploymentConfig, model_path: Path, group: int = 0) -> Engine:
    """The engine `config.engine.kind` names, for worker group `group`."""
    if config.engine.kind == "mocker":
        return build_mocker_engine(config, model_path)
    if config.engine.kind == "trtllm":
        return build_trtllm_engine(config, model_path, group)
    return build_torch_engine(config, model_path)

"""`python -m mpi_workers --config FILE --group G --index I`: run one worker of a deployment.

The config is the resolved one `hpcserve up` writes into the run folder (service endpoints and
model path filled in). `--engine-factory module:callable` replaces the engine (tests, plug-in
engines): the callable gets `(config, model_path)` and returns an `Engine`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from contract.config import ConfigError, DeploymentConfig, load_config
from contract.plan import worker_id
from mpi_workers.engine.base import Engine
from mpi_workers.logging_setup import configure_logging, mpi_rank, worker_tag
from mpi_workers.worker import Worker, serve_until_signal

logger = logging.getLogger("mpi_workers")

EngineFactory = Callable[[DeploymentConfig, Path], Engine]


def build_torch_engine(config: DeploymentConfig, model_path: Path) -> Engine:
    """The built-in PyTorch engine, configured from `config.engine`."""
    import torch

    from mpi_workers.engine.engine import TorchEngine

    engine_config = config.engine
    if engine_config.torch_threads:
        torch.set_num_threads(engine_config.torch_threads)
    device = engine_config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None if engine_config.dtype == "auto" else getattr(torch, engine_config.dtype)
    return TorchEngine(
        model_dir=model_path,
        device=device,
        dtype=dtype,
        block_size=engine_config.block_size,
        num_blocks=engine_config.num_blocks,
        kv_cache_memory_bytes=engine_config.kv_cache_memory_mb * 2**20,
        max_num_seqs=engine_config.max_num_seqs,
        max_num_batched_tokens=engine_config.max_num_batched_tokens,
        max_model_len=engine_config.max_model_len,
        model_name=config.model.served_model_name(),
    )


def load_factory(spec: str) -> EngineFactory:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"--engine-factory {spec!r} must look like module:callable")
    return getattr(importlib.import_module(module_name), attr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mpi_workers", description=__doc__)
    parser.add_argument("--config", required=True, help="resolved deployment config (YAML)")
    parser.add_argument("--group", type=int, default=0, help="index into config.workers")
    parser.add_argument("--index", type=int, default=0, help="instance within the group")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds (SIGTERM)")
    parser.add_argument("--engine-factory", default=None, help="module:callable (tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, environ={})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # logging is not set up yet
        return 2
    if not 0 <= args.group < len(config.workers):
        print(f"error: --group {args.group}: config has {len(config.workers)} group(s)",
              file=sys.stderr)  # fmt: skip
        return 2
    group = config.workers[args.group]
    configure_logging(worker_tag(group.role, args.group, args.index, mpi_rank()))
    services = config.services
    if not services.etcd.endpoint or not services.nats.endpoint:
        logger.error("services.etcd.endpoint and services.nats.endpoint must be set")
        return 2
    model_path = config.model.resolved_path()
    if args.engine_factory is None and not (model_path / "config.json").is_file():
        logger.error(
            "model.path: %s is not a model folder (run `hpcserve model prepare` for the default)",
            model_path,
        )
        return 2
    factory = load_factory(args.engine_factory) if args.engine_factory else build_torch_engine
    logger.info("loading engine for %s", model_path)
    engine = factory(config, model_path)
    worker = Worker(
        engine,
        deployment=config.name,
        worker_id=worker_id(group.role, args.group, args.index),
        role=group.role,
        nats_url=services.nats.endpoint,
        etcd_endpoint=services.etcd.endpoint,
        lease_ttl_s=services.lease_ttl_s,
        capacity=config.engine.max_num_seqs,
        model_name=config.model.served_model_name(),
        drain_timeout_s=args.drain_timeout,
    )
    asyncio.run(serve_until_signal(worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from mpi_workers.engine.factory import build_engine, build_torch_engine  # noqa: F401
from mpi_workers.logging_setup import configure_logging, mpi_rank, worker_tag
from mpi_workers.worker import Worker, serve_until_signal

logger = logging.getLogger("mpi_workers")

EngineFactory = Callable[[DeploymentConfig, Path], Engine]


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
    configure_logging(f"[worker g{args.group} i{args.index} rank{mpi_rank()}]")
    try:
        # The launcher's resolved file is complete: no environment overrides on top.
        config = load_config(args.config, environ={})
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    if not 0 <= args.group < len(config.workers):
        logger.error("--group %d: the config has %d group(s)", args.group, len(config.workers))
        return 2
    group = config.workers[args.group]
    configure_logging(worker_tag(group.role, args.group, args.index, mpi_rank()))
    services = config.services
    if not services.etcd.endpoint or not services.nats.endpoint:
        logger.error("services.etcd.endpoint and services.nats.endpoint must be set")
        return 2
    model_path = config.model.resolved_path()
    needs_model = args.engine_factory is None and config.engine.kind != "mocker"
    if needs_model and not (model_path / "config.json").is_file():
        logger.error(
            "model.path: %s is not a model folder (run `hpcserve model prepare` for the default)",
            model_path,
        )
        return 2
    factory = load_factory(args.engine_factory) if args.engine_factory else build_engine
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

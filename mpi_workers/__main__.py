"""`python -m mpi_workers --config FILE --group G --index I [--instances K]`: run one worker
of a deployment, or K simulated (mocker) workers I..I+K-1 in this one process.

The config is the resolved one `hpcserve up` writes into the run folder (service endpoints and
model path filled in). `--engine-factory module:callable` replaces the engine (tests, plug-in
engines): the callable gets `(config, model_path)` and returns an `Engine`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from contract.config import ConfigError, DeploymentConfig, load_config
from contract.model_fit import check_model_tp
from contract.plan import cpu_threads_per_rank, worker_id, worker_ranks_here
from mpi_workers.disagg import worker_class
from mpi_workers.engine.base import Engine
from mpi_workers.engine.factory import build_engine, build_torch_engine, torch_placement
from mpi_workers.logging_setup import configure_logging, mpi_rank, worker_tag
from mpi_workers.rank_guard import launched_as_mpi_rank, run_guarded
from mpi_workers.ranks import RankGroup, leave_group, resolve_rank_group
from mpi_workers.worker import serve_until_signal

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
    parser.add_argument("--instances", type=int, default=1,
                        help="host instances INDEX..INDEX+K-1 here (engine.kind mocker)")
    parser.add_argument("--worker-id", default=None,
                        help="registered id (default ROLE-gGROUP-iINDEX); worker jobs name theirs")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds (SIGTERM)")
    parser.add_argument("--engine-factory", default=None, help="module:callable (tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if launched_as_mpi_rank():  # see mpi_workers.rank_guard: the rank runs as our child
        return run_guarded(["-m", "mpi_workers", *(sys.argv[1:] if argv is None else argv)])
    args = parse_args(argv)
    configure_logging(f"[worker g{args.group} i{args.index} rank{mpi_rank()}]")
    if args.instances < 1 or (args.instances > 1 and args.worker_id):
        logger.error("--instances: at least 1, and 1 with --worker-id (one id)")
        return 2
    try:
        # The launcher's resolved file is complete: no environment overrides on top.
        config = load_config(args.config, environ={})
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    if not 0 <= args.group < len(config.workers):
        logger.error("--group %d: the config has %d group(s)", args.group, len(config.workers))
        return 2
    spec = config.workers[args.group]
    torch_tp = config.engine.kind == "torch" and spec.tp > 1
    if torch_tp and spec.role in ("prefill", "decode") and args.engine_factory is None:
        from mpi_workers.kv_transfer import preload

        preload(config.disaggregation.kv_transfer)  # before mpi4py loads MPI (see preload)
    try:
        ranks = resolve_rank_group(config, args.group, args.index)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    configure_logging(
        worker_tag(ranks.role, ranks.group, ranks.index, ranks.rank, args.instances)
    )
    if args.instances > 1 and (config.engine.kind != "mocker" or ranks.size > 1):
        logger.error("--instances: several workers in one process need engine.kind mocker "
                     "(workers.%d.per_process)", args.group)  # fmt: skip
        return 2
    services = config.services
    if not services.etcd.endpoint or not services.nats.endpoint:
        logger.error("services.etcd.endpoint and services.nats.endpoint must be set")
        return 2
    model_path = config.model.resolved_path()
    if config.engine.kind == "trtllm" and config.engine.trtllm.model:
        model_path = Path(config.engine.trtllm.model).expanduser()
    needs_model = args.engine_factory is None and config.engine.kind != "mocker"
    if needs_model and not (model_path / "config.json").is_file():
        logger.error(
            "model.path: %s is not a model folder (run `hpcserve model prepare` for the default)",
            model_path,
        )
        return 2
    if ranks.size > 1:
        return run_tp_rank(args, config, ranks, model_path)
    logger.info("loading %d engine(s) for %s", args.instances, model_path)
    try:
        if args.engine_factory:
            factory = load_factory(args.engine_factory)
            engines = [factory(config, model_path) for _ in range(args.instances)]
        else:
            engines = [build_engine(config, model_path, args.group) for _ in range(args.instances)]
    except (ConfigError, ValueError) as exc:  # e.g. an engine YAML key TensorRT-LLM rejects
        logger.error("engine %s cannot start: %s", config.engine.kind, exc)
        return 2
    return serve(args, config, ranks, engines)


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """`asyncio.run(main)`, on uvloop where it is installed (uvicorn[standard] brings it):
    its loop turns cost a fraction of asyncio's, and a worker's request path (NATS in and
    out, one engine step's outputs per loop turn) is mostly loop turns."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def serve(
    args: argparse.Namespace, config: DeploymentConfig, ranks: RankGroup, engines: list[Engine]
) -> int:
    """Run the worker (the group's leader), or the simulated workers instances `ranks.index`..
    this process hosts, one per engine, until a signal (0) or an engine failure (1)."""
    group = config.workers[ranks.group]
    services = config.services
    hosted = len(engines) > 1
    workers = []
    for offset, engine in enumerate(engines):
        index = ranks.index + offset
        worker_cls, extra = worker_class(config, group.role, engine)
        workers.append(worker_cls(
            engine,
            **extra,
            deployment=config.name,
            worker_id=args.worker_id or worker_id(group.role, ranks.group, index),
            role=group.role,
            nats_url=services.nats.endpoint,
            etcd_endpoint=services.etcd.endpoint,
            lease_ttl_s=services.lease_ttl_s,
            capacity=config.engine.max_num_seqs,
            model_name=config.model.served_model_name(),
            drain_timeout_s=args.drain_timeout,
            log_tag=worker_tag(group.role, ranks.group, index, ranks.rank) if hosted else None,
        ))  # fmt: skip
    run_event_loop(serve_until_signal(workers))
    return 1 if any(worker.failed_reason for worker in workers) else 0


def run_tp_rank(
    args: argparse.Namespace, config: DeploymentConfig, ranks: RankGroup, model_path: Path
) -> int:
    """One rank of a tensor-parallel group: the leader serves, the others follow."""
    from mpi_workers.engine.torch.follower import build_follower_runner, follow, ignore_stop_signals
    from mpi_workers.engine.torch.tp import TpRuntime, pick_device

    if config.engine.kind != "torch" or args.engine_factory:
        logger.error("workers.%d.tp: tp > 1 needs engine.kind torch", ranks.group)
        return 2
    try:
        check_model_tp(model_path, config)  # before any load, on every rank
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    if not ranks.is_leader:
        ignore_stop_signals()
    device = pick_device(config.engine.device, ranks.comm)
    if device.type == "cpu" and not config.engine.torch_threads:
        import torch

        ranks_here = worker_ranks_here(default=ranks.size)
        torch.set_num_threads(cpu_threads_per_rank(os.cpu_count() or 1, ranks_here))
    tp = TpRuntime.init(ranks.comm, device)
    logger.info("rank %d of %d on %s (leader: world rank %d)",
                ranks.rank, ranks.size, device, ranks.leader_world_rank)  # fmt: skip
    try:
        if ranks.is_leader:
            logger.info("loading engine shard for %s", model_path)
            code = serve(args, config, ranks, [build_torch_engine(config, model_path, tp)])
        else:
            _, dtype = torch_placement(config, tp)
            runner = build_follower_runner(model_path, tp, dtype, config.engine.block_size)
            code = follow(runner, tp)
    except BaseException:
        logger.exception("tensor-parallel rank failed")
        code = 1
    leave_group(code)


if __name__ == "__main__":
    sys.exit(main())

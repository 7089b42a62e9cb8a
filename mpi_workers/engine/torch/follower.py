"""A tensor-parallel follower rank: hold a shard, run every step the leader broadcasts.

The follower has no scheduler, no NATS, no etcd: it receives the pool sizes once, then
`StepPlan`s until the leader sends None (shutdown); between steps it may send a group
command with a `follow(kv_cache, tp)` method (`kv_transfer.shards`: KV moved to or from
this rank's heads in disaggregated serving). Any error (including a dead leader,
which surfaces as a closed connection) ends the process non-zero, so the leader's next
collective fails at once instead of hanging.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch

from mpi_workers.engine.torch.kv_cache import KvCache
from mpi_workers.engine.torch.loader import load_model
from mpi_workers.engine.torch.model_config import load_model_config
from mpi_workers.engine.torch.model_runner import ModelRunner, StepPlan
from mpi_workers.engine.torch.tp import TpRuntime

logger = logging.getLogger(__name__)


def ignore_stop_signals() -> None:
    """SIGTERM/SIGINT go to the whole process group; only the leader acts on them (it then
    tells us to stop), so a follower never leaves the group mid-step."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def build_follower_runner(
    model_dir: Path, tp: TpRuntime, dtype: torch.dtype | None, block_size: int
) -> ModelRunner:
    """Receive the leader's pool sizes, load this rank's shard and its KV cache."""
    from mpi_workers.engine.torch.loader import default_dtype

    sizes = tp.broadcast_object()
    dtype = dtype or default_dtype(tp.device)
    cfg = load_model_config(model_dir)
    model = load_model(model_dir, cfg, sizes["max_model_len"], tp.device, dtype, tp=tp.group)
    cache = KvCache(cfg, sizes["num_blocks"], block_size, dtype, tp.device, tp.size)
    return ModelRunner(
        model, cache, sizes["enforce_eager"], sizes["max_num_seqs"],
        max(sizes["max_num_batched_tokens"], 1),
    )  # fmt: skip


def follow(runner: ModelRunner, tp: TpRuntime) -> int:
    """Run broadcast steps until the leader says stop; returns the exit code (0)."""
    logger.info("following the leader's steps")
    steps = 0
    start = time.monotonic()
    with torch.inference_mode():
        while True:
            plan = tp.broadcast_object()
            if plan is None:
                break
            if isinstance(plan, StepPlan):
                runner.execute(plan)
            else:  # a group command (disaggregation: KV to or from this rank's heads)
                plan.follow(runner.kv_cache, tp)
            steps += 1
    logger.info("leader said stop after %d steps (%.0f s)", steps, time.monotonic() - start)
    tp.close()
    return 0

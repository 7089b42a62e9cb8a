"""Greedy image requests on the tiny VLM with the torch engine, plain or as a TP group (run
under `mpirun -n N`): the leader encodes the images and ships their feature rows in the step
plans; the followers hold only decoder shards.

    python tests/mpi_workers/vlm_tp_script.py MODEL_DIR MAX_TOKENS

Rank 0 prints one JSON line: {"tp": N, "tokens": [[...] per request], "cached": [...]}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlm_inputs as vi

from contract.vlm import load_vlm_info
from mpi_workers.engine.torch.engine import TorchEngine
from mpi_workers.ranks import leave_group

BLOCK_SIZE = 4


def build_engine(model_dir: str | Path, tp=None) -> TorchEngine:
    """The engine of every run (TP=1 in the test process, TP=N under mpirun)."""
    return TorchEngine(model_dir, tp=tp, num_blocks=256, block_size=BLOCK_SIZE, max_num_seqs=4,
                       max_num_batched_tokens=40)  # fmt: skip


async def lead(engine: TorchEngine, max_tokens: int) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(engine.model_dir))
    token = load_vlm_info(engine.model_dir).image_token_id
    first = [vi.image_bytes(1)]
    cases = [first, [vi.image_bytes(2, 40, 90), vi.image_bytes(3)], first]
    await engine.start()
    outs = []
    for index, images in enumerate(cases):  # one by one: the third hits the first's blocks
        ids = vi.processor_inputs(processor, images)["input_ids"][0].tolist()
        request = vi.request(f"r{index}", ids, vi.image_refs(ids, token, images), max_tokens)
        media = engine.prepare_media(request, images)
        outs.append(await engine.generate_all(request, media))
    await engine.shutdown()
    return {
        "tokens": [o.token_ids for o in outs],
        "cached": [o.num_cached_tokens for o in outs],
        "errors": [o.error for o in outs],
    }


def main() -> int:
    model_dir, max_tokens = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO, format=f"%(levelname)s [tp rank{rank}] %(name)s: %(message)s"
    )
    size = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    tp = None
    if size > 1:
        from mpi4py import MPI

        from mpi_workers.engine.torch.tp import TpRuntime
        from mpi_workers.mpi_shm import release_segment_names

        release_segment_names(MPI.COMM_WORLD)  # as the product's ranks do: a killed rank leaks none
        tp = TpRuntime.init(MPI.COMM_WORLD, torch.device("cpu"), timeout_s=30)
    if tp is not None and tp.rank != 0:
        from mpi_workers.engine.torch.follower import build_follower_runner, follow

        runner = build_follower_runner(Path(model_dir), tp, torch.float32, BLOCK_SIZE)
        leave_group(follow(runner, tp))
    result = asyncio.run(lead(build_engine(model_dir, tp), max_tokens))
    result["tp"] = size
    print(json.dumps(result), flush=True)
    if tp is not None:
        leave_group(0)  # as the product's ranks leave: MPI finalized before any teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())

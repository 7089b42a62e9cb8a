"""Greedy generation with the torch engine, plain or as a TP group (run under `mpirun -n N`).

    python tests/mpi_workers/tp_script.py MODEL_DIR '[[1, 2, 3], [4, 5]]' MAX_TOKENS

Rank 0 prints one JSON line: {"tp": N, "tokens": [[...] per prompt], "logits": [[...] last
prompt position, per prompt]}. `--prompt-logprobs K`: the requests want their prompt's
logprobs and top K too ("prompt_logprobs": [[logprob, ...] per prompt], "prompt_top":
[[[top ids] per position] per prompt]); `--chunk T`: max_num_batched_tokens.
`--kill-rank R --kill-after K`: rank R SIGKILLs itself after
following K steps (the follower-crash test); then rank 0 prints the outputs it got (and
writes them to `--out FILE`: after a rank's death, mpirun may stop forwarding output).
`--logit-bias '{"ID": BIAS}'` sets every request's logit_bias (the leader samples).
`--embed LAST|MEAN`: each prompt is also embedded, beside the generations ("embeddings":
[[float, ...] per prompt]).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

import torch

from contract.messages import GenerateRequest, PoolingParams, SamplingParams, decode_embedding
from mpi_workers.engine.torch.engine import TorchEngine
from mpi_workers.engine.torch.model_runner import StepPlan
from mpi_workers.ranks import leave_group


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("prompts")
    parser.add_argument("max_tokens", type=int)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-after", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON here (rank 0)")
    parser.add_argument("--prompt-logprobs", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--logit-bias", default="{}", help="JSON: token id -> bias")
    parser.add_argument("--embed", choices=["LAST", "MEAN"], default=None)
    return parser.parse_args()


async def lead(
    engine: TorchEngine,
    prompts: list[list[int]],
    max_tokens: int,
    prompt_logprobs: int | None,
    bias: dict[int, float],
    embed: str | None = None,
) -> dict:
    await engine.start()
    requests = [
        GenerateRequest(
            request_id=f"r{i}", token_ids=p,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                    prompt_logprobs=prompt_logprobs, logit_bias=bias),
        )
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    if embed is not None:
        requests += [
            GenerateRequest(request_id=f"e{i}", token_ids=p,
                            pooling=PoolingParams(pooling_type=embed))  # type: ignore[arg-type]
            for i, p in enumerate(prompts)
        ]  # fmt: skip
    outs = await asyncio.gather(*(engine.generate_all(r) for r in requests))
    embedded = outs[len(prompts) :]
    outs = outs[: len(prompts)]
    result = {
        "tokens": [o.token_ids for o in outs],
        "finish": [o.finish_reason for o in outs],
        "errors": [o.error for o in outs],
    }
    if prompt_logprobs is not None:
        result["prompt_logprobs"] = [[e.logprob for e in o.prompt_logprobs or []] for o in outs]
        result["prompt_top"] = [
            [[t.token_id for t in e.top] for e in o.prompt_logprobs or []] for o in outs
        ]
    if embed is not None:
        result["embeddings"] = [decode_embedding(o.embedding or "") for o in embedded]
    if engine.failed is None:
        result["logits"] = [prompt_logits(engine, p) for p in prompts]
    await engine.shutdown()
    return result


def prompt_logits(engine: TorchEngine, prompt: list[int]) -> list[float]:
    """Logits at the last prompt position (fresh blocks from the top of the pool)."""
    n = len(prompt)
    blocks = -(-n // engine.block_size)
    table = list(range(engine.block_manager.num_blocks - blocks, engine.block_manager.num_blocks))
    plan = StepPlan(list(prompt), list(range(n)), prefills=[(0, n, 0, table)], sample_rows=[n - 1])
    if engine.tp is not None:
        engine.tp.broadcast_object(plan)
    return engine.runner.execute(plan)[0].tolist()


def main() -> int:
    args = parse()
    torch.set_num_threads(1)
    rank = os.environ.get("PMI_RANK", "0")
    logging.basicConfig(
        level=logging.INFO, format=f"%(levelname)s [tp rank{rank}] %(name)s: %(message)s"
    )
    prompts = json.loads(args.prompts)
    size = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    tp = None
    if size > 1:
        from mpi4py import MPI

        from mpi_workers.engine.torch.tp import TpRuntime
        from mpi_workers.mpi_shm import release_segment_names

        release_segment_names(MPI.COMM_WORLD)  # as the product's ranks do: a killed rank leaks none
        tp = TpRuntime.init(MPI.COMM_WORLD, torch.device("cpu"), timeout_s=30)
    kwargs = dict(num_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=args.chunk)
    if tp is not None and tp.rank != 0:
        from mpi_workers.engine.torch.follower import build_follower_runner, follow

        runner = build_follower_runner(args.model_dir, tp, torch.float32, 4)
        if tp.rank == args.kill_rank:
            with torch.inference_mode():
                for _ in range(args.kill_after):
                    runner.execute(tp.broadcast_object())
            os.kill(os.getpid(), signal.SIGKILL)
        leave_group(follow(runner, tp))
    engine = TorchEngine(args.model_dir, tp=tp, **kwargs)
    bias = {int(token): value for token, value in json.loads(args.logit_bias).items()}
    result = asyncio.run(
        lead(engine, prompts, args.max_tokens, args.prompt_logprobs, bias, args.embed)
    )
    result["tp"] = size
    result["failed"] = engine.failed
    if args.out:  # hydra may stop forwarding our output once a rank died
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result), flush=True)
    if engine.failed:
        os._exit(1)
    if tp is not None:
        leave_group(0)  # as the product's ranks leave: MPI finalized before any teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())

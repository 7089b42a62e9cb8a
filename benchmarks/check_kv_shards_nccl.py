"""GPU check of kv_transfer.shards: a TP group scatters a global KV staging to its ranks' head
shards (KvScatter) and gathers it back (KvGather), device tensors over NCCL; bitwise checks.

    mpirun -n 2 python3 benchmarks/check_kv_shards_nccl.py 4   # 4 KV heads: 2 per rank
    mpirun -n 2 python3 benchmarks/check_kv_shards_nccl.py 1   # 1 KV head: replicated
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpi_workers.engine.torch.tp import TpRuntime, pick_device
from mpi_workers.kv_transfer.blocks import pack_blocks
from mpi_workers.kv_transfer.layout import head_range
from mpi_workers.kv_transfer.shards import KvGather, KvScatter, lead_gather, lead_scatter

LAYERS, POOL_BLOCKS, BLOCK_SIZE, HEAD_DIM = 3, 10, 16, 64


def main(heads: int) -> None:
    comm = MPI.COMM_WORLD
    device = pick_device("auto", comm)
    tp = TpRuntime.init(comm, device)
    shape = (POOL_BLOCKS, BLOCK_SIZE, heads, HEAD_DIM)
    g = torch.Generator().manual_seed(0)
    truth_k = [torch.randn(shape, generator=g).to(device, torch.bfloat16) for _ in range(LAYERS)]
    truth_v = [torch.randn(shape, generator=g).to(device, torch.bfloat16) for _ in range(LAYERS)]
    lo, hi = head_range(heads, tp.size, tp.rank)
    local = (POOL_BLOCKS, BLOCK_SIZE, hi - lo, HEAD_DIM)
    cache = SimpleNamespace(
        k=[torch.zeros(local, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)],
        v=[torch.zeros(local, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)],
    )
    src, dst = [1, 4, 7], [0, 9, 3]
    staging = pack_blocks(truth_k, truth_v, src)
    if tp.rank == 0:
        tp.broadcast_object(KvScatter(dst))
        lead_scatter(tp, cache, staging, dst, heads)
    else:
        tp.broadcast_object().follow(cache, tp)
    for layer in range(LAYERS):
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(cache.k[layer][d], truth_k[layer][s, :, lo:hi]), (tp.rank, layer)
            assert torch.equal(cache.v[layer][d], truth_v[layer][s, :, lo:hi]), (tp.rank, layer)
    if tp.rank == 0:
        tp.broadcast_object(KvGather(dst))
        back = lead_gather(tp, cache, dst, heads)
        assert back.device == staging.device and torch.equal(back, staging), "gather mismatch"
        print(f"OK tp={tp.size} heads={heads} scatter+gather on {device}", flush=True)
    else:
        tp.broadcast_object().follow(cache, tp)
    tp.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)

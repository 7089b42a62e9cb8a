"""The KV transfer layer: head mapping (pure), pack/unpack, and real tensors over every
transport, in one process (two endpoints) and across two processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
import torch

from mpi_workers.kv_transfer import KvLayout, KvLayoutMismatch, TransferError, make_transport
from mpi_workers.kv_transfer.blocks import pack_blocks, unpack_blocks
from mpi_workers.kv_transfer.layout import HeadSlice, head_range, plan_head_transfers

LAYOUT = KvLayout(num_layers=3, block_size=4, num_kv_heads=3, head_dim=8, dtype="float32")
TRANSPORTS = ["tcp", "ucx", "nixl"]


# ----- head mapping --------------------------------------------------------------------------


def test_head_ranges_split_evenly_and_replicate_when_short() -> None:
    assert [head_range(3, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]
    assert [head_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert head_range(3, 1, 0) == (0, 3)
    assert [head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="do not split"):
        head_range(3, 2, 0)
    with pytest.raises(ValueError, match="outside"):
        head_range(3, 3, 3)


def test_tp1_prefill_feeds_tp3_decode() -> None:
    assert plan_head_transfers(3, 1, 3) == [
        HeadSlice(src=0, dst=0, lo=0, hi=1, src_offset=0, dst_offset=0),
        HeadSlice(src=0, dst=1, lo=1, hi=2, src_offset=1, dst_offset=0),
        HeadSlice(src=0, dst=2, lo=2, hi=3, src_offset=2, dst_offset=0),
    ]


def test_tp3_prefill_feeds_tp1_decode_and_equal_tp_is_rank_to_rank() -> None:
    assert [(s.src, s.dst, s.lo, s.dst_offset) for s in plan_head_transfers(3, 3, 1)] == [
        (0, 0, 0, 0), (1, 0, 1, 1), (2, 0, 2, 2),
    ]  # fmt: skip
    assert [(s.src, s.dst) for s in plan_head_transfers(4, 2, 2)] == [(0, 0), (1, 1)]


@pytest.mark.parametrize("heads,src_tp,dst_tp", [(8, 2, 4), (8, 4, 2), (2, 1, 4), (2, 4, 1)])
def test_every_destination_head_arrives_exactly_once(heads: int, src_tp: int, dst_tp: int):
    slices = plan_head_transfers(heads, src_tp, dst_tp)
    for dst in range(dst_tp):
        lo, hi = head_range(heads, dst_tp, dst)
        got = sorted(h for s in slices if s.dst == dst for h in range(s.lo, s.hi))
        assert got == list(range(lo, hi))
    for s in slices:  # offsets index the ranks' local head arrays
        assert s.lo - head_range(heads, src_tp, s.src)[0] == s.src_offset
        assert s.lo - head_range(heads, dst_tp, s.dst)[0] == s.dst_offset


def test_layout_mismatch_names_the_fields() -> None:
    other = KvLayout(num_layers=3, block_size=16, num_kv_heads=3, head_dim=8, dtype="bfloat16")
    with pytest.raises(KvLayoutMismatch, match=r"block_size: 4 here vs 16.*dtype"):
        LAYOUT.check_compatible(other)
    LAYOUT.check_compatible(KvLayout(**{**LAYOUT.to_dict(), "tp_size": 3}))  # TP may differ


# ----- pack / unpack ---------------------------------------------------------------------------


def _cache(num_blocks: int = 10) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return (
        [torch.randn(shape) for _ in range(LAYOUT.num_layers)],
        [torch.randn(shape) for _ in range(LAYOUT.num_layers)],
    )


def test_pack_then_unpack_copies_exactly_the_blocks_and_heads() -> None:
    k, v = _cache()
    staging = pack_blocks(k, v, [7, 2, 5])
    assert staging.shape == (3, 3, 2, 4, 3, 8)
    k2, v2 = _cache()
    before = [t.clone() for t in k2]
    unpack_blocks(staging, k2, v2, [0, 1, 9])
    for layer in range(3):
        assert torch.equal(k2[layer][[0, 1, 9]], k[layer][[7, 2, 5]])
        assert torch.equal(v2[layer][[0, 1, 9]], v[layer][[7, 2, 5]])
        assert torch.equal(k2[layer][2:9], before[layer][2:9])  # other blocks untouched
    # one head range into another rank's local offset (TP head mapping)
    part = pack_blocks(k, v, [3], heads=(1, 2))
    k3, v3 = _cache()
    unpack_blocks(part, k3, v3, [4], head_offset=2)
    assert torch.equal(k3[1][4, :, 2], k[1][3, :, 1])


# ----- transports ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", TRANSPORTS)
async def test_transport_moves_real_tensors_and_refuses_mismatches(backend: str) -> None:
    sender, receiver = make_transport(backend, "p"), make_transport(backend, "d")
    await sender.start()
    await receiver.start()
    try:
        k, v = _cache()
        staged = pack_blocks(k, v, [1, 4, 6])
        dest = torch.zeros_like(staged)
        ticket = receiver.expect("t1", dest, LAYOUT)
        await asyncio.gather(sender.push(ticket, staged, LAYOUT), receiver.wait("t1", 30))
        assert torch.equal(dest, staged)
        # a second transfer of another size through the same endpoints (fresh registration)
        big = torch.randn(3 * 2**20 // 4)
        dest_big = torch.zeros_like(big)
        ticket = receiver.expect("t2", dest_big, LAYOUT)
        await asyncio.gather(sender.push(ticket, big, LAYOUT), receiver.wait("t2", 30))
        assert torch.equal(dest_big, big)
        # handshake: other block size → clear error before any byte moves
        ticket = receiver.expect("t3", torch.zeros(8), LAYOUT)
        wrong = KvLayout(**{**LAYOUT.to_dict(), "block_size": 32})
        with pytest.raises(KvLayoutMismatch, match="block_size"):
            await sender.push(ticket, torch.zeros(8), wrong)
        receiver.cancel("t3")
        # a cancelled (aborted) transfer is refused by the receiver
        ticket = receiver.expect("t4", torch.zeros(8), LAYOUT)
        receiver.cancel("t4")
        if backend != "nixl":  # one-sided: NIXL writes land regardless; the waiter is gone
            with pytest.raises(TransferError, match="not expected"):
                await sender.push(ticket, torch.ones(8), LAYOUT)
        with pytest.raises(TransferError):
            await receiver.wait("t4", 1)
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("backend", TRANSPORTS)
async def test_concurrent_pushes_to_one_receiver(backend: str) -> None:
    """Several transfers in flight between the same two endpoints, as when serving at
    concurrency 8: each lands intact in its own buffer."""
    sender, receiver = make_transport(backend, "p"), make_transport(backend, "d")
    await sender.start()
    await receiver.start()
    try:
        sources = [torch.randn(2**16 + i) for i in range(8)]
        dests = [torch.zeros_like(src) for src in sources]
        tickets = [receiver.expect(f"c{i}", d, LAYOUT) for i, d in enumerate(dests)]
        await asyncio.gather(
            *(sender.push(t, src, LAYOUT) for t, src in zip(tickets, sources, strict=True)),
            *(receiver.wait(f"c{i}", 30) for i in range(len(dests))),
        )
        for src, dest in zip(sources, dests, strict=True):
            assert torch.equal(src, dest)
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("backend", ["ucx", "nixl"])
def test_transfer_between_two_processes(backend: str) -> None:
    """A receiver process prints its ticket; this process pushes; the receiver checks."""
    receiver = textwrap.dedent(
        f"""
        import asyncio, json, sys, torch
        from mpi_workers.kv_transfer import KvLayout, make_transport
        async def main():
            t = make_transport({backend!r}, "recv")
            await t.start()
            layout = KvLayout(**json.loads(sys.argv[1]))
            buf = torch.zeros(2**20)
            print("TICKET", json.dumps(t.expect("x", buf, layout)), flush=True)
            await t.wait("x", 60)
            expected = torch.arange(2**20, dtype=torch.float32)
            print("RESULT", "OK" if torch.equal(buf, expected) else "BAD", flush=True)
            await t.close()
        asyncio.run(main())
        """
    )
    import json

    proc = subprocess.Popen(
        [sys.executable, "-c", receiver, json.dumps(LAYOUT.to_dict())],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ticket = json.loads(_line(proc.stdout, "TICKET "))

        async def push() -> None:
            sender = make_transport(backend, "send")
            await sender.start()
            try:
                await sender.push(ticket, torch.arange(2**20, dtype=torch.float32), LAYOUT)
            finally:
                await sender.close()

        asyncio.run(push())
        assert _line(proc.stdout, "RESULT ").strip() == "OK"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _line(stream, prefix: str) -> str:
    """The rest of the first line starting with `prefix` (libraries log to stdout too)."""
    for line in stream:
        if line.startswith(prefix):
            return line[len(prefix) :]
    raise AssertionError(f"no {prefix!r} line")


def _spy_registrations(transport, seen: list[tuple[str, int, int]]) -> None:
    """Record every (agent, address, length) a NIXL transport registers."""
    register = transport._agent.register_memory

    def spy(tensor, *args, **kwargs):
        descs = register(tensor, *args, **kwargs)
        nbytes = tensor.numel() * tensor.element_size()
        seen.append((transport.agent_name, tensor.data_ptr(), nbytes))
        return descs

    transport._agent.register_memory = spy


async def test_nixl_reused_addresses_never_re_register() -> None:
    """The GPU serving failure's pattern, on the CPU: every transfer's source and destination
    sit at the addresses of the previous one's (as when the CUDA caching allocator hands a
    freed staging buffer out again), in three sizes. Each must land intact; no agent may
    register an address range twice (a peer that loaded the range refuses new keys for it:
    NIXL_ERR_NOT_ALLOWED); the sender loads the receiver's metadata only when the receiver's
    registered memory grew; and a cancelled transfer's late write lands in memory that no
    later transfer uses."""
    sender, receiver = make_transport("nixl", "p"), make_transport("nixl", "d")
    seen: list[tuple[str, int, int]] = []
    _spy_registrations(sender, seen)
    _spy_registrations(receiver, seen)
    await sender.start()
    await receiver.start()
    try:
        src_store, dst_store = torch.empty(2**18), torch.empty(2**18)
        sizes = [2**16, 2**17 + 5, 2**18]
        for i in range(18):
            n = sizes[i % len(sizes)]
            src, dest = src_store[:n], dst_store[:n]
            src.copy_(torch.arange(n, dtype=torch.float32) + i)
            dest.zero_()
            ticket = receiver.expect(f"r{i}", dest, LAYOUT)
            await asyncio.gather(sender.push(ticket, src, LAYOUT), receiver.wait(f"r{i}", 30))
            assert torch.equal(dest, src), f"transfer {i} landed wrong"
        assert len(seen) == len(set(seen)), f"an address range was registered twice: {seen}"
        assert len(seen) <= 4  # one block per size class and side, not one per transfer
        assert sender.metadata_loads == receiver._arena.generation <= 2

        # a late write to a cancelled expectation must not reach a later transfer's memory
        late = receiver.expect("late", torch.zeros(2**16), LAYOUT)
        receiver.cancel("late")
        dest = dst_store[: 2**16]
        dest.zero_()
        ticket = receiver.expect("next", dest, LAYOUT)
        assert ticket["descs"] != late["descs"]
        await sender.push(late, torch.full((2**16,), 7.0), LAYOUT)
        src = torch.arange(2**16, dtype=torch.float32)
        await asyncio.gather(sender.push(ticket, src, LAYOUT), receiver.wait("next", 30))
        assert torch.equal(dest, src)
        for _ in range(200):  # the late write's notification frees its block again
            if not receiver._orphans:
                break
            await asyncio.sleep(0.01)
        assert not receiver._orphans
        assert len(seen) == len(set(seen))
    finally:
        await sender.close()
        await receiver.close()

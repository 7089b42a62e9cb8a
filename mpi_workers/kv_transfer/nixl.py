"""NIXL transport (NVIDIA's inference transfer library, UCX backend): one-sided WRITE from
the sender's registered buffer into the receiver's registered buffer, completion announced
to the receiver by a NIXL notification carrying the transfer id.

Registered memory: every buffer NIXL touches comes from the transport's `_Arena`, a
grow-only set of registered blocks (DRAM for CPU tensors, VRAM for CUDA tensors; the GPU→GPU
figures are in benchmarks/README.md). A block is registered once, when the arena grows, and
stays registered (and allocated: its address cannot be handed out again) until `close`.
Why: NIXL cannot update a remote agent's metadata; a peer that loads metadata describing an
address range it already knows with other keys fails with NIXL_ERR_NOT_ALLOWED, and the agent
is unusable afterwards. Registering each caller's buffer anew produced exactly that on the GPU,
where the CUDA caching allocator hands the same address out again. With the arena, the
receiver's metadata only ever grows, so a sender loads it once per arena generation.

Cost: two extra device-local copies per transfer, caller's tensor → send block on the sender
and receive block → caller's buffer on the receiver (a few µs for MiBs of VRAM; a memcpy on
the CPU), against a memory registration and a metadata load per push before. Blocks are
power-of-two sized (≥ 64 KiB), so the arena holds at most twice the bytes in flight at its
peak, per device, for the transport's lifetime.

A CUDA tensor is written only once the kernels that produced it have finished
(`wait_for_device`). The receiver's agent metadata and memory descriptors travel inside the
ticket, so no side channel (NIXL's own listener) is needed: the ticket already goes over NATS.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import logging
import os
import time
import uuid
from typing import Any

import torch

from mpi_workers.kv_transfer.base import (
    KvTransport,
    Pending,
    Ticket,
    TransferError,
    header_for,
    log_rate,
    wait_for_device,
)
from mpi_workers.kv_transfer.layout import KvLayout

logger = logging.getLogger(__name__)

POLL_S = 0.0005
MIN_BLOCK = 64 * 1024


def _import_nixl():
    if not torch.cuda.is_available():
        os.environ.setdefault("UCX_TLS", "tcp")
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        for module in ("nixl_cu12", "nixl_cu13"):  # a build without the `nixl` meta package
            try:
                api = importlib.import_module(f"{module}._api")
            except ImportError:
                continue
            return api.nixl_agent, api.nixl_agent_config
        raise ImportError(
            "kv_transfer 'nixl' needs nixl: pip install nixl-cu12 && pip install --no-deps nixl"
        ) from None
    return nixl_agent, nixl_agent_config


def _block_size(nbytes: int) -> int:
    return max(MIN_BLOCK, 1 << max(nbytes - 1, 0).bit_length())


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (raises on a non-contiguous one)."""
    return tensor.view(-1).view(torch.uint8)


def _default_stream(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Copies run on the device's default stream, where the engine packs and unpacks."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.default_stream(device))


class _Arena:
    """Grow-only NIXL-registered memory of one agent, handed out as whole blocks.

    Blocks are keyed by (device, power-of-two size). `take` reuses a free block or registers
    a new one (`generation` counts registrations, so a peer knows when the metadata grew);
    `give` returns one. A block GPU work may still read (a copy out of it, queued on the
    default stream) cools down until an event recorded after that work has completed. A
    block a remote write may still reach, or a local read may still use, is never given
    back: it stays registered and is simply not reused. Nothing is deregistered before
    `close`. Used from the event loop's thread only.
    """

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._registered: list[tuple[torch.Tensor, Any]] = []
        self._free: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._cooling: list[tuple[torch.Tensor, Any]] = []
        self.generation = 0
        self.nbytes = 0

    @staticmethod
    def _key(block: torch.Tensor) -> tuple[str, int]:
        return str(block.device), block.numel()

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        self._reap()
        size = _block_size(nbytes)
        free = self._free.get((str(device), size))
        if free:
            return free.pop()
        block = torch.empty(size, dtype=torch.uint8, device=device)
        registration = self._agent.register_memory(block)
        self._registered.append((block, registration))
        self.generation += 1
        self.nbytes += size
        logger.debug("nixl arena: +%d KiB on %s (%d MiB in all)", size >> 10, device,
                     self.nbytes >> 20)  # fmt: skip
        return block

    def give(self, block: torch.Tensor, *, after_default_stream: bool = False) -> None:
        if after_default_stream and block.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.default_stream(block.device))
            self._cooling.append((block, event))
            return
        self._free.setdefault(self._key(block), []).append(block)

    def _reap(self) -> None:
        if not self._cooling:
            return
        still = []
        for block, event in self._cooling:
            if event.query():
                self._free.setdefault(self._key(block), []).append(block)
            else:
                still.append((block, event))
        self._cooling = still

    def close(self) -> None:
        for _, registration in self._registered:
            with contextlib.suppress(Exception):
                self._agent.deregister_memory(registration)
        self._registered.clear()
        self._free.clear()
        self._cooling.clear()


class NixlTransport(KvTransport):
    backend = "nixl"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        agent_cls, config_cls = _import_nixl()
        self.agent_name = f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # No NIXL progress thread: it busy-polls a core, which starves the engine's stepping
        # thread on small CPU hosts; progress is driven by our notification and state polls.
        config = config_cls(enable_prog_thread=False, backends=["UCX"])
        self._agent = agent_cls(self.agent_name, config)
        self._arena = _Arena(self._agent)
        self._metadata: tuple[int, str] = (-1, "")
        # remote agent → (its name in NIXL, the arena generation of the metadata loaded)
        self._remote_agents: dict[str, tuple[str, int]] = {}
        # cancelled expectations whose block a late write may still reach: transfer id → block
        self._orphans: dict[str, torch.Tensor] = {}
        self.metadata_loads = 0
        self._poller: asyncio.Task[None] | None = None

    async def start(self, host: str = "127.0.0.1") -> str:
        self.address = f"nixl://{self.agent_name}"
        self._poller = asyncio.create_task(self._poll_notifications(), name="nixl-notifs")
        return self.address

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for transfer_id in list(self._pending):
            self.cancel(transfer_id)
        for remote, _ in list(self._remote_agents.values()):
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(remote)
        self._remote_agents.clear()
        self._orphans.clear()
        self._arena.close()

    def _local_metadata(self) -> str:
        """This agent's metadata (every arena block), serialized again only when it grew."""
        generation, encoded = self._metadata
        if generation != self._arena.generation:
            encoded = base64.b64encode(self._agent.get_agent_metadata()).decode()
            self._metadata = (self._arena.generation, encoded)
        return encoded

    def _ticket_extra(self, pending: Pending) -> dict[str, Any]:
        nbytes = pending.buffer.numel() * pending.buffer.element_size()
        _bytes(pending.buffer)  # contiguous, or refuse now rather than on landing
        block = self._arena.take(nbytes, pending.buffer.device)
        pending.extra["block"] = block
        descs = self._agent.get_xfer_descs(block[:nbytes])
        return {
            "agent": self.agent_name,
            "generation": self._arena.generation,
            "metadata": self._local_metadata(),
            "descs": base64.b64encode(self._agent.get_serialized_descs(descs)).decode(),
        }

    def _release(self, pending: Pending) -> None:
        block = pending.extra.pop("block", None)
        if block is not None:  # never landed: the sender may still write into it
            self._orphans[pending.transfer_id] = block

    def _on_notification(self, transfer_id: str) -> None:
        pending = self._pending.get(transfer_id)
        block = pending.extra.pop("block", None) if pending is not None else None
        if pending is None or block is None:
            orphan = self._orphans.pop(transfer_id, None)
            if orphan is not None:  # the late write has landed: the block is free again
                self._arena.give(orphan)
            return
        nbytes = pending.buffer.numel() * pending.buffer.element_size()
        with _default_stream(block.device):
            _bytes(pending.buffer).copy_(block[:nbytes])
        self._arena.give(block, after_default_stream=True)
        self._landed(transfer_id, nbytes)

    async def _poll_notifications(self) -> None:
        """Every POLL_S while a transfer is expected, backing off to 10 ms when none is.

        With no progress thread, this agent's UCX worker moves only when polled here: a
        notification (and whatever else of a transfer needs the receiver's side) waits for
        the next poll, so a backed-off poll while a transfer is expected adds up to 10 ms per
        step to the transfer."""
        idle = POLL_S
        while True:
            notifs = self._agent.get_new_notifs()
            got = False
            for messages in notifs.values():
                for message in messages:
                    got = True
                    try:
                        self._on_notification(bytes(message).decode())
                    except Exception:
                        logger.exception("nixl: handling notification %r failed", message)
            idle = POLL_S if got or self._pending else min(idle * 2, 0.01)
            await asyncio.sleep(idle)

    def _remote(self, ticket: Ticket) -> str:
        """The receiver's agent as loaded here: its metadata is loaded the first time, and
        again only when the ticket's arena generation is newer than the loaded one.

        Safe because the receiver's registered memory only grows (`_Arena`): a newer
        metadata blob repeats every block already loaded with the same keys and adds the new
        ones, which NIXL accepts. It would refuse (NIXL_ERR_NOT_ALLOWED, then
        NIXL_ERR_INVALID_PARAM on every later load of that agent) a range it knows with other
        keys: that is what per-transfer registration did on the GPU, where the caching
        allocator reuses addresses. Tickets may arrive out of order; an older generation is
        a subset of what is loaded. A failed load forgets the agent (NIXL drops it too);
        a ticket without a generation (an older receiver) is loaded every time, as before."""
        agent = ticket["agent"]
        generation = ticket.get("generation", -1)  # none: a receiver without an arena
        known = self._remote_agents.get(agent)
        if known is not None and generation >= 0 and known[1] >= generation:
            return known[0]
        try:
            remote = self._agent.add_remote_agent(base64.b64decode(ticket["metadata"]))
        except Exception:
            self._remote_agents.pop(agent, None)
            raise
        self.metadata_loads += 1
        name = remote.decode() if isinstance(remote, bytes) else remote
        self._remote_agents[agent] = (name, generation)
        return name

    async def push(self, ticket: Ticket, tensor: torch.Tensor, layout: KvLayout) -> None:
        header = header_for(ticket, tensor, layout)
        if ticket.get("backend") != "nixl":
            raise TransferError(f"receiver speaks {ticket.get('backend')!r}, this sender nixl")
        started = time.perf_counter()
        nbytes = header["nbytes"]
        data = tensor.detach().contiguous()
        block = self._arena.take(nbytes, data.device)
        posted = False  # once a WRITE may be reading the block, it is reused only if DONE
        done = False
        handle = None
        try:
            with _default_stream(block.device):
                block[:nbytes].copy_(_bytes(data))
            await wait_for_device(block)  # NIXL's WRITE does not wait for PyTorch's stream
            remote = self._remote(ticket)
            local = self._agent.get_xfer_descs(block[:nbytes])
            remote_descs = self._agent.deserialize_descs(base64.b64decode(ticket["descs"]))
            handle = self._agent.initialize_xfer(
                "WRITE", local, remote_descs, remote, ticket["transfer_id"].encode()
            )
            posted = True
            state = self._agent.transfer(handle)
            while state == "PROC":
                await asyncio.sleep(POLL_S)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"NIXL transfer to {ticket['agent']} failed ({state})")
            done = True
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"NIXL transfer to {ticket['agent']} broke: {exc}") from exc
        finally:
            if handle is not None:
                with contextlib.suppress(Exception):
                    self._agent.release_xfer_handle(handle)
            if done or not posted:
                self._arena.give(block)
        log_rate("nixl push", nbytes, started)

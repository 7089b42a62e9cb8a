"""NIXL transport (NVIDIA's inference transfer library, UCX backend): one-sided WRITE from
the sender's registered buffer into the receiver's registered buffer, completion announced
to the receiver by a NIXL notification carrying the transfer id.

Both buffers are registered with NIXL (DRAM for CPU tensors, VRAM for CUDA tensors; the
GPU→GPU figures are in benchmarks/README.md). A CUDA tensor is written only once the kernels
that produced it have finished (`wait_for_device`). The receiver's agent metadata and
memory descriptors travel inside the ticket, so no side channel (NIXL's own listener) is
needed: the ticket already goes over NATS.
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
        self._remote_agents: dict[str, str] = {}
        self._poller: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

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
        for remote in list(self._remote_agents.values()):
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(remote)

    def _ticket_extra(self, pending: Pending) -> dict[str, Any]:
        registration = self._agent.register_memory(pending.buffer)
        pending.extra["registration"] = registration
        descs = self._agent.get_xfer_descs(pending.buffer)
        return {
            "agent": self.agent_name,
            "metadata": base64.b64encode(self._agent.get_agent_metadata()).decode(),
            "descs": base64.b64encode(self._agent.get_serialized_descs(descs)).decode(),
        }

    def _release(self, pending: Pending) -> None:
        registration = pending.extra.pop("registration", None)
        if registration is not None:
            self._agent.deregister_memory(registration)

    async def _poll_notifications(self) -> None:
        idle = POLL_S
        while True:
            notifs = self._agent.get_new_notifs()
            got = False
            for messages in notifs.values():
                for message in messages:
                    got = True
                    transfer_id = bytes(message).decode()
                    pending = self._pending.get(transfer_id)
                    if pending is not None:
                        size = pending.buffer.numel() * pending.buffer.element_size()
                        self._landed(transfer_id, size)
            idle = POLL_S if got else min(idle * 2, 0.01)
            await asyncio.sleep(idle)

    def _remote(self, ticket: Ticket) -> str:
        """Load the receiver's metadata on every push: it carries the keys of memory it
        registered since the last time (a cached copy fails with NIXL_ERR_NOT_FOUND).

        Known GPU limitation (2×H200, serving; the one-shot benchmark transfers work): a load
        fails with NIXL_ERR_NOT_ALLOWED, which NIXL returns for a descriptor it already holds
        (same address, length, device) with other keys ("metadata updates" unsupported), and
        then every later load of that agent fails (NIXL_ERR_INVALID_PARAM; forgetting the agent
        first did not clear it). Our reading: the receiver registers each staging buffer anew
        and the CUDA caching allocator hands out the same address again. The fix belongs on the
        receiver: register its receive memory once (a pool) and reuse the registrations."""
        remote = self._agent.add_remote_agent(base64.b64decode(ticket["metadata"]))
        name = remote.decode() if isinstance(remote, bytes) else remote
        self._remote_agents[ticket["agent"]] = name
        return name

    async def push(self, ticket: Ticket, tensor: torch.Tensor, layout: KvLayout) -> None:
        header = header_for(ticket, tensor, layout)
        if ticket.get("backend") != "nixl":
            raise TransferError(f"receiver speaks {ticket.get('backend')!r}, this sender nixl")
        started = time.perf_counter()
        data = tensor.detach().contiguous()
        await wait_for_device(data)  # NIXL's WRITE does not wait for PyTorch's stream
        registration = None
        handle = None
        try:
            remote = self._remote(ticket)
            registration = self._agent.register_memory(data)
            local = self._agent.get_xfer_descs(data)
            remote_descs = self._agent.deserialize_descs(base64.b64decode(ticket["descs"]))
            handle = self._agent.initialize_xfer(
                "WRITE", local, remote_descs, remote, ticket["transfer_id"].encode()
            )
            state = self._agent.transfer(handle)
            while state == "PROC":
                await asyncio.sleep(POLL_S)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"NIXL transfer to {ticket['agent']} failed ({state})")
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"NIXL transfer to {ticket['agent']} broke: {exc}") from exc
        finally:
            if handle is not None:
                with contextlib.suppress(Exception):
                    self._agent.release_xfer_handle(handle)
            if registration is not None:
                with contextlib.suppress(Exception):
                    self._agent.deregister_memory(registration)
        self.bytes_sent += header["nbytes"]
        log_rate("nixl push", header["nbytes"], started)

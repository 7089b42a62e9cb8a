"""The transport interface: the receiver expects a transfer, the sender pushes to its ticket.

Why this shape: the decode worker owns the destination memory (its reserved blocks' staging
buffer), so it registers that memory and describes it in a JSON-able *ticket*; the prefill
worker gets the ticket (over NATS), checks the layout and writes. The same two calls serve
both disaggregation strategies. Every I/O call is a coroutine; nothing blocks the event loop
for longer than a memory registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from mpi_workers.kv_transfer.layout import KvLayout, KvLayoutMismatch

logger = logging.getLogger(__name__)

Ticket = dict[str, Any]


class TransferError(RuntimeError):
    """A KV transfer that did not complete (peer gone, refused, timed out)."""


@dataclass
class Pending:
    """A transfer the receiver waits for: its buffer and the future the data lands in."""

    transfer_id: str
    buffer: torch.Tensor
    layout: KvLayout
    future: asyncio.Future[None]
    extra: dict[str, Any] = field(default_factory=dict)


def byte_view(tensor: torch.Tensor) -> Any:
    """A flat uint8 view of a contiguous tensor that transports can read or write in place:
    numpy for CPU memory, the tensor itself (CUDA array interface) for GPU memory."""
    if not tensor.is_contiguous():
        raise ValueError("KV transfer buffers must be contiguous")
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat.numpy() if flat.device.type == "cpu" else flat


async def wait_for_device(tensor: torch.Tensor) -> None:
    """Until the kernels that wrote `tensor` (a CUDA tensor) have finished, off the event loop.

    Why: UCX and NIXL read GPU memory with their own copy engines and streams, which do not
    wait for PyTorch's stream: without this, a just-packed staging tensor can leave before the
    pack kernels have run. The engine (packs and steps alike) runs on the device's default
    stream, so that stream is waited for, not the whole device: a device-wide sync from this
    thread would also invalidate a CUDA graph the engine thread may be capturing.
    """
    if tensor.device.type == "cuda":
        await asyncio.to_thread(torch.cuda.default_stream(tensor.device).synchronize)


def header_for(ticket: Ticket, tensor: torch.Tensor, layout: KvLayout) -> dict[str, Any]:
    """The sender's half of the handshake; raises before any byte moves when it cannot fit."""
    remote = KvLayout.from_dict(ticket["layout"])
    remote.check_compatible(layout)
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes != ticket["nbytes"]:
        raise KvLayoutMismatch(
            f"KV transfer {ticket['transfer_id']}: sending {nbytes} bytes, receiver reserved "
            f"{ticket['nbytes']}"
        )
    return {"transfer_id": ticket["transfer_id"], "nbytes": nbytes, "layout": layout.to_dict()}


class KvTransport(ABC):
    """One endpoint of KV transfer: both receives (`expect`/`wait`) and sends (`push`)."""

    backend: str = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address = ""
        self._pending: dict[str, Pending] = {}
        self.bytes_received = 0

    @abstractmethod
    async def start(self, host: str = "127.0.0.1") -> str:
        """Start listening; returns the address that goes on the worker card."""

    @abstractmethod
    async def close(self) -> None:
        """Stop listening and release every registration."""

    @abstractmethod
    async def push(self, ticket: Ticket, tensor: torch.Tensor, layout: KvLayout) -> None:
        """Write `tensor` into the receiver's buffer named by `ticket`; returns when landed."""

    def _ticket_extra(self, pending: Pending) -> dict[str, Any]:
        """Backend-specific ticket fields (NIXL: agent metadata and memory descriptors)."""
        return {}

    def _release(self, pending: Pending) -> None:  # noqa: B027 - optional hook
        """Backend-specific cleanup of a finished or cancelled expectation."""

    def expect(self, transfer_id: str, buffer: torch.Tensor, layout: KvLayout) -> Ticket:
        """Get ready to receive into `buffer`; the returned ticket goes to the sender."""
        if transfer_id in self._pending:
            raise ValueError(f"transfer {transfer_id} is already expected")
        future = asyncio.get_running_loop().create_future()
        pending = Pending(transfer_id, buffer, layout, future)
        self._pending[transfer_id] = pending
        ticket: Ticket = {
            "backend": self.backend,
            "address": self.address,
            "transfer_id": transfer_id,
            "nbytes": buffer.numel() * buffer.element_size(),
            "layout": layout.to_dict(),
        }
        ticket.update(self._ticket_extra(pending))
        return ticket

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        """Until the data has landed; TransferError/TimeoutError otherwise. Always forgets it."""
        pending = self._pending.get(transfer_id)
        if pending is None:
            raise TransferError(f"transfer {transfer_id} is not expected")
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(pending.future)
        finally:
            self.cancel(transfer_id)

    def future(self, transfer_id: str) -> asyncio.Future[None]:
        return self._pending[transfer_id].future

    def cancel(self, transfer_id: str) -> None:
        """Forget an expectation; data arriving later is refused. Idempotent."""
        pending = self._pending.pop(transfer_id, None)
        if pending is None:
            return
        if not pending.future.done():
            pending.future.cancel()
        with contextlib.suppress(Exception):
            self._release(pending)

    def _landed(self, transfer_id: str, nbytes: int) -> None:
        pending = self._pending.get(transfer_id)
        if pending is not None and not pending.future.done():
            self.bytes_received += nbytes
            pending.future.set_result(None)

    def _check_incoming(self, header: dict[str, Any]) -> Pending:
        """The receiver's half of the handshake: a known transfer with the same layout."""
        pending = self._pending.get(header.get("transfer_id", ""))
        if pending is None:
            raise TransferError(f"transfer {header.get('transfer_id')!r} is not expected here")
        pending.layout.check_compatible(KvLayout.from_dict(header["layout"]))
        expected = pending.buffer.numel() * pending.buffer.element_size()
        if header.get("nbytes") != expected:
            raise KvLayoutMismatch(
                f"transfer {pending.transfer_id}: {header.get('nbytes')} bytes offered, "
                f"{expected} expected"
            )
        return pending


def log_rate(what: str, nbytes: int, started: float) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    logger.debug(
        "%s %.2f MiB in %.1f ms (%.0f MiB/s)",
        what,
        nbytes / 2**20,
        elapsed * 1e3,
        nbytes / 2**20 / elapsed,
    )

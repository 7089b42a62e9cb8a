"""UCX transport over the `ucxx` package (UCX-Py's successor): tagged send/recv straight
into the receiver's buffer. UCX registers the buffers itself (its registration cache) for
rendezvous transfers; CUDA tensors go through the CUDA array interface (GPU→GPU over UCX's
cuda_ipc/cuda_copy transports; measured on 2×H200 in benchmarks/README.md). A CUDA tensor is
sent only once the kernels that wrote it have finished (`wait_for_device`).

On a machine without a GPU, `UCX_TLS` defaults to `tcp` here: UCX's shared-memory
transports fail in some sandboxes and TCP always works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time

import torch

from mpi_workers.kv_transfer.base import (
    KvTransport,
    Ticket,
    TransferError,
    byte_view,
    header_for,
    log_rate,
    wait_for_device,
)
from mpi_workers.kv_transfer.layout import KvLayout

logger = logging.getLogger(__name__)


def _import_ucxx():
    if not torch.cuda.is_available():
        os.environ.setdefault("UCX_TLS", "tcp")
    try:
        import ucxx
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "kv_transfer 'ucx' needs the ucxx package: pip install 'hpcserve[ucx]'"
        ) from exc
    return ucxx


class UcxTransport(KvTransport):
    backend = "ucx"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._ucxx = _import_ucxx()
        self._listener = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1") -> str:
        self._listener = self._ucxx.create_listener(self._on_endpoint, 0)
        self.address = f"{host}:{self._listener.port}"
        return self.address

    async def close(self) -> None:
        for transfer_id in list(self._pending):
            self.cancel(transfer_id)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _on_endpoint(self, ep) -> None:
        try:
            header = json.loads(bytes(await ep.recv_obj()))
            try:
                pending = self._check_incoming(header)
            except Exception as exc:
                await ep.send_obj(f"ERR {exc}".encode())
                return
            await ep.send_obj(b"OK")
            await ep.recv(byte_view(pending.buffer))
            await ep.send_obj(b"DONE")  # before waking the waiter, who may close us down
            self._landed(pending.transfer_id, header["nbytes"])
            # The sender closes the endpoint once it has read DONE; dropping it from this side
            # first could cancel DONE in flight ("Request canceled" on the sender).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await ep.recv_obj()
            return
        except Exception as exc:  # the sender died or hung up: the waiter times out/fails
            logger.warning("incoming UCX KV transfer failed: %s", exc)
        try:
            await ep.close()
        except Exception as exc:
            logger.debug("UCX endpoint close: %s", exc)

    async def push(self, ticket: Ticket, tensor: torch.Tensor, layout: KvLayout) -> None:
        header = header_for(ticket, tensor, layout)
        host, _, port = ticket["address"].rpartition(":")
        started = time.perf_counter()
        try:
            ep = await self._ucxx.create_endpoint(host, int(port))
        except Exception as exc:
            raise TransferError(f"cannot reach UCX receiver {ticket['address']}: {exc}") from exc
        step = "handshake"
        try:
            await ep.send_obj(json.dumps(header).encode())
            answer = bytes(await ep.recv_obj()).decode()
            if answer != "OK":
                raise TransferError(f"receiver refused the KV transfer: {answer[4:]}")
            data = tensor.detach().contiguous()
            await wait_for_device(data)
            step = "data"
            await ep.send(byte_view(data))
            step = "confirmation"
            if bytes(await ep.recv_obj()) != b"DONE":
                raise TransferError("receiver did not confirm the KV transfer")
            with contextlib.suppress(Exception):  # the data has landed; this is courtesy
                await ep.send_obj(b"BYE")
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(
                f"UCX transfer to {ticket['address']} broke during {step}: {exc}"
            ) from exc
        finally:
            try:
                await ep.close()
            except Exception as exc:
                logger.debug("UCX endpoint close: %s", exc)
        log_rate("ucx push", header["nbytes"], started)

"""UCX transport over the `ucxx` package (UCX-Py's successor): tagged send/recv straight
into the receiver's buffer. UCX registers the buffers itself (its registration cache) for
rendezvous transfers; CUDA tensors go through the CUDA array interface (GPU→GPU over UCX's
cuda_ipc/cuda_copy transports; measured on 2×H200 in benchmarks/README.md). A CUDA tensor is
sent only once the kernels that wrote it have finished (`wait_for_device`).

Endpoints are reused: a push borrows an idle endpoint to the receiver's address (or opens
one), runs header → OK → data → DONE on it, and gives it back; the receiver serves transfers
on an endpoint until the sender says BYE or hangs up. Opening an endpoint was most of the
~4 ms fixed cost per transfer on 2×H200. An endpoint that failed mid-transfer is closed, not
reused.

On a machine without a GPU, `UCX_TLS` defaults to `tcp` here: UCX's shared-memory
transports fail in some sandboxes and TCP always works.
"""

from __future__ import annotations

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
        self._idle: dict[str, list] = {}  # receiver address -> idle endpoints to it

    async def start(self, host: str = "127.0.0.1") -> str:
        self._listener = self._ucxx.create_listener(self._on_endpoint, 0)
        self.address = f"{host}:{self._listener.port}"
        return self.address

    async def close(self) -> None:
        for transfer_id in list(self._pending):
            self.cancel(transfer_id)
        for endpoints in self._idle.values():
            for ep in endpoints:
                with contextlib.suppress(Exception):
                    await ep.send_obj(b"BYE")
                await _close(ep)
        self._idle.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _on_endpoint(self, ep) -> None:
        """Serve transfers arriving on one endpoint until BYE or the sender hangs up."""
        receiving = False
        try:
            while True:
                message = bytes(await ep.recv_obj())
                if message == b"BYE":
                    break
                receiving = True
                header = json.loads(message)
                try:
                    pending = self._check_incoming(header)
                except Exception as exc:
                    await ep.send_obj(f"ERR {exc}".encode())
                    receiving = False
                    continue
                await ep.send_obj(b"OK")
                await ep.recv(byte_view(pending.buffer))
                await ep.send_obj(b"DONE")  # before waking the waiter, who may close us down
                self._landed(pending.transfer_id, header["nbytes"])
                receiving = False
        except Exception as exc:
            if receiving:  # the sender died or hung up mid-transfer: the waiter times out/fails
                logger.warning("incoming UCX KV transfer failed: %s", exc)
            else:  # an idle endpoint went away (the sender closed or exited)
                logger.debug("UCX endpoint closed by the sender: %s", exc)
        # The sender closes the endpoint after BYE; dropping it from this side first could
        # cancel messages still in flight to it.
        if not receiving:
            return
        await _close(ep)

    async def _new_endpoint(self, address: str):
        host, _, port = address.rpartition(":")
        try:
            return await self._ucxx.create_endpoint(host, int(port))
        except Exception as exc:
            raise TransferError(f"cannot reach UCX receiver {address}: {exc}") from exc

    async def _handshake(self, address: str, header: dict) -> tuple[object, str]:
        """(endpoint, the receiver's answer to `header`). An idle endpoint is tried first; if it
        turns out broken (the receiver restarted, the link dropped), a new one is opened."""
        message = json.dumps(header).encode()
        idle = self._idle.get(address)
        while idle:
            ep = idle.pop()
            try:
                await ep.send_obj(message)
                return ep, bytes(await ep.recv_obj()).decode()
            except Exception as exc:
                logger.debug("idle UCX endpoint to %s broken (%s); opening a new one", address, exc)
                await _close(ep)
        ep = await self._new_endpoint(address)
        try:
            await ep.send_obj(message)
            return ep, bytes(await ep.recv_obj()).decode()
        except Exception as exc:
            await _close(ep)
            raise TransferError(f"UCX transfer to {address} broke during handshake: {exc}") from exc

    async def push(self, ticket: Ticket, tensor: torch.Tensor, layout: KvLayout) -> None:
        header = header_for(ticket, tensor, layout)
        address = ticket["address"]
        started = time.perf_counter()
        ep, answer = await self._handshake(address, header)
        step = "handshake"
        reusable = False
        try:
            if answer != "OK":
                reusable = answer.startswith("ERR ")  # a clean refusal leaves it usable
                raise TransferError(f"receiver refused the KV transfer: {answer[4:]}")
            data = tensor.detach().contiguous()
            await wait_for_device(data)
            step = "data"
            await ep.send(byte_view(data))
            step = "confirmation"
            if bytes(await ep.recv_obj()) != b"DONE":
                raise TransferError("receiver did not confirm the KV transfer")
            reusable = True
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"UCX transfer to {address} broke during {step}: {exc}") from exc
        finally:
            if reusable:
                self._idle.setdefault(address, []).append(ep)
            else:
                await _close(ep)
        self.bytes_sent += header["nbytes"]
        log_rate("ucx push", header["nbytes"], started)


async def _close(ep) -> None:
    try:
        await ep.close()
    except Exception as exc:
        logger.debug("UCX endpoint close: %s", exc)

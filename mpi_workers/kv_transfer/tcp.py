"""Plain asyncio TCP transport: no registration, no zero-copy. The benchmark's baseline and a
fallback that needs no extra package."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time

import torch

from mpi_workers.kv_transfer.base import (
    KvTransport,
    Ticket,
    TransferError,
    byte_view,
    header_for,
    log_rate,
)
from mpi_workers.kv_transfer.layout import KvLayout

logger = logging.getLogger(__name__)

CHUNK = 4 * 2**20


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack("!I", await reader.readexactly(4))
    return await reader.readexactly(size)


def _frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


class TcpTransport(KvTransport):
    backend = "tcp"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> str:
        self._server = await asyncio.start_server(self._on_connection, host, 0, limit=CHUNK)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for transfer_id in list(self._pending):
            self.cancel(transfer_id)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            header = json.loads(await _read_frame(reader))
            try:
                pending = self._check_incoming(header)
            except Exception as exc:
                writer.write(_frame(f"ERR {exc}".encode()))
                await writer.drain()
                return
            writer.write(_frame(b"OK"))
            await writer.drain()
            view = byte_view(pending.buffer) if pending.buffer.device.type == "cpu" else None
            staging = None if view is not None else bytearray(header["nbytes"])
            target = memoryview(view if view is not None else staging)
            offset = 0
            while offset < len(target):
                data = await reader.read(min(CHUNK, len(target) - offset))
                if not data:
                    raise TransferError("sender closed the connection mid-transfer")
                target[offset : offset + len(data)] = data
                offset += len(data)
            if staging is not None:  # GPU destination: one host-to-device copy, off the loop
                src = torch.frombuffer(staging, dtype=torch.uint8)
                dest = pending.buffer.reshape(-1).view(torch.uint8)
                await asyncio.to_thread(dest.copy_, src)
            self._landed(pending.transfer_id, offset)
            writer.write(_frame(b"DONE"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TransferError) as exc:
            logger.warning("incoming KV transfer failed: %s", exc)
        finally:
            writer.close()

    async def push(self, ticket: Ticket, tensor: torch.Tensor, layout: KvLayout) -> None:
        header = header_for(ticket, tensor, layout)
        host, _, port = ticket["address"].rpartition(":")
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, int(port), limit=CHUNK)
        except OSError as exc:
            raise TransferError(f"cannot reach KV receiver {ticket['address']}: {exc}") from exc
        try:
            writer.write(_frame(json.dumps(header).encode()))
            answer = (await _read_frame(reader)).decode()
            if answer != "OK":
                raise TransferError(f"receiver refused the KV transfer: {answer[4:]}")
            data = tensor.detach().contiguous()
            if data.device.type != "cpu":  # a synchronous device-to-host copy: off the loop
                data = await asyncio.to_thread(data.cpu)
            writer.write(memoryview(byte_view(data)))
            await writer.drain()
            if (await _read_frame(reader)) != b"DONE":
                raise TransferError("receiver did not confirm the KV transfer")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise TransferError(f"KV transfer to {ticket['address']} broke: {exc}") from exc
        finally:
            writer.close()
        log_rate("tcp push", header["nbytes"], started)

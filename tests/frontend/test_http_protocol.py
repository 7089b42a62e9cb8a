"""The frontend's uvicorn protocol (`frontend.http_protocol`): a whole answer's head and body
leave in one socket write, other responses as uvicorn writes them, bytes in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from frontend.http_protocol import CorkingTransport, corking_protocol
from frontend.responses import AnsweredResponse


class RecordingTransport:
    """Records each write that reaches it (the socket's writes), else the real transport."""

    def __init__(self, transport: Any, writes: list[bytes] | None = None) -> None:
        self.transport = transport
        self.writes: list[bytes] = [] if writes is None else writes
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.transport is not None:
            self.transport.write(data)

    def is_closing(self) -> bool:
        return self.closed if self.transport is None else self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if self.transport is None else self.transport.get_extra_info(name)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def test_corked_writes_leave_as_one_in_order() -> None:
    sink = RecordingTransport(None)
    corking = CorkingTransport(sink)  # type: ignore[arg-type]
    corking.write(b"a")  # not corked: straight through
    corking.cork()
    corking.write(b"head")
    corking.write(memoryview(b"body"))
    assert sink.writes == [b"a"]
    corking.uncork()
    assert sink.writes == [b"a", b"headbody"]
    corking.uncork()  # nothing held: nothing written
    assert sink.writes == [b"a", b"headbody"]
    corking.cork()
    corking.write(b"last")
    corking.close()  # what is held goes out before the close
    assert sink.writes == [b"a", b"headbody", b"last"] and sink.closed
    corking.cork()
    corking.write(b"late")
    corking.uncork()  # the connection is closing: nothing more is written
    assert sink.writes == [b"a", b"headbody", b"last"]
    assert corking.get_extra_info("peername") == ("127.0.0.1", 1)  # the wrapped transport's


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """/answered: an AnsweredResponse; anything else: Starlette's Response."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    after: list[Any] = []
    response: Response
    if scope["path"] == "/answered":
        response = AnsweredResponse({"text": "x" * 300}, after, "chatcmpl-1")
    else:
        response = Response(b"plain body", media_type="text/plain")
    await response(scope, receive, send)


@contextlib.asynccontextmanager
async def serving(http: str, writes: list[bytes]) -> AsyncIterator[int]:
    """uvicorn with the frontend's corking protocol for `http`, each socket write recorded."""
    base = corking_protocol(http)

    class Recorded(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(RecordingTransport(transport, writes))

    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=Recorded, lifespan="off",
                            access_log=False, log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await task


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    """One keep-alive POST; the whole response (head and Content-Length body)."""
    writer.write(f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{{}}".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))  # fmt: skip
    return head + await reader.readexactly(length)


def sent(writes: list[bytes]) -> list[bytes]:
    return [w for w in writes if w]  # h11 ends a body with an empty write


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_an_answer_is_one_socket_write(http: str) -> None:
    """Over a real uvicorn: an AnsweredResponse's head and body reach the socket in one
    write, the same bytes a client reads; a plain response still takes uvicorn's two;
    answers keep coming right on one keep-alive connection."""
    writes: list[bytes] = []
    async with serving(http, writes) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(3):
                before = len(writes)
                answer = await exchange(reader, writer, "/answered")
                assert sent(writes[before:]) == [answer]
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"x-request-id: chatcmpl-1\r\n" in answer
                assert answer.endswith(b'{"text":"' + b"x" * 300 + b'"}')
                before = len(writes)
                plain = await exchange(reader, writer, "/plain")
                assert len(sent(writes[before:])) == 2 and b"".join(writes[before:]) == plain
                assert plain.endswith(b"\r\n\r\nplain body")
        finally:
            writer.close()
            await writer.wait_closed()

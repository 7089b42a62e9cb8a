"""One socket write per whole (non-streamed) answer.

uvicorn writes a response's head when the app sends `http.response.start` and its body
when it sends `http.response.body`: two `send` syscalls under uvloop (it writes at once when
nothing is queued), two TCP segments, and a client that may wake for each. For an answer
whose body is known before its head is sent (`responses.AnsweredResponse`), the two writes
can be one. ASGI has no message for that, so the frontend's uvicorn protocol hands its
connection a `CorkingTransport`: a transport that holds writes while corked and writes them
as one when uncorked. The answer finds its connection's transport through a context variable
set while uvicorn parses the request (the ASGI task uvicorn creates there copies it); where
it finds none (another server, tests through ASGI), it sends as before.

Only the transport is wrapped: uvicorn's protocol code runs unchanged.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional: uvicorn then speaks h11
    HttpToolsProtocol = None

_connection: ContextVar[CorkingTransport | None] = ContextVar("hpcserve_connection", default=None)


def current_connection() -> CorkingTransport | None:
    """The corking transport of the connection whose request this task serves, if any."""
    return _connection.get()


class CorkingTransport:
    """A transport whose writes are held between `cork()` and `uncork()` and then written
    as one; everything else is the wrapped transport's. Closing writes what is held first,
    so the bytes keep their order."""

    __slots__ = ("_held", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._held: list[bytes] | None = None

    def cork(self) -> None:
        if self._held is None:
            self._held = []

    def uncork(self) -> None:
        held, self._held = self._held, None
        if held and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            self._held.append(bytes(data))
        else:
            self.transport.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.uncork()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, abort, ...
        return getattr(self.transport, name)


class _Corking:
    """Mixin for a uvicorn HTTP protocol: its connection's transport corks (see module)."""

    _corking: CorkingTransport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._corking = CorkingTransport(transport)
        super().connection_made(self._corking)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        _connection.set(self._corking)  # copied into the ASGI task uvicorn creates here
        super().data_received(data)  # type: ignore[misc]


class CorkingH11Protocol(_Corking, H11Protocol):
    """uvicorn's h11 protocol over a `CorkingTransport`."""


if HttpToolsProtocol is not None:

    class CorkingHttpToolsProtocol(_Corking, HttpToolsProtocol):
        """uvicorn's httptools protocol over a `CorkingTransport`."""


def frontend_protocol() -> type[asyncio.Protocol]:
    """The frontend's uvicorn protocol: httptools' parser where installed (the faster), else
    h11's, over corking transports."""
    return corking_protocol("httptools" if HttpToolsProtocol is not None else "h11")


def corking_protocol(http: str) -> type[asyncio.Protocol]:
    """The uvicorn protocol class for `http` ("httptools" or "h11") over corking transports."""
    if http == "httptools" and HttpToolsProtocol is not None:
        return CorkingHttpToolsProtocol
    if http == "h11":
        return CorkingH11Protocol
    raise ValueError(f"http: no corking protocol for {http!r} (httptools installed, or h11)")

"""uvicorn's httptools protocol, with a response's head sent in one write with its body.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`,
and the body with the next `http.response.body`: two socket writes per response. On
loopback (and on any link) each write wakes the client, which parses the head and sleeps
again until the body comes; on a machine whose cores are all busy the write that wakes the
client also hands it the core, and the frontend finishes the response only after the client
has gone back to sleep. Measured at c=1 (benchmarks/bench_frontend.py, a 2-core VM):
a request's last ~0.2 ms were this.

`HeadWithBodyProtocol` holds the head of each response and writes it with the response's
first body write (for a stream: its first event, which the frontend has in hand when it
starts the response). A `100 Continue` interim response is written before the response
starts and is never held; closing the connection writes a held head first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadWithBodyTransport:
    """One response's view of the connection's transport: the first write after the
    response started (its head) waits for the next one and goes out with it."""

    __slots__ = ("_cycle", "_head", "_head_seen", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle  # uvicorn's RequestResponseCycle: `response_started`
        self._head: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif not self._head_seen and self._cycle.response_started:
            self._head_seen = True
            self._head = bytes(data)
        else:
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def flush(self) -> None:
        """Write a held head now (nothing else will follow it)."""
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head)

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, ...
        return getattr(self._transport, name)


class HeadWithBodyProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose responses go out head and first body part together."""

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before:  # a new request (not an upgrade)
            transport = HeadWithBodyTransport(self.transport, cycle)
            cycle.transport = transport
            on_response = cycle.on_response

            def flush_then(on_response: Any = on_response) -> None:
                transport.flush()  # a response with no body write (HEAD): its head alone
                on_response()

            cycle.on_response = flush_then

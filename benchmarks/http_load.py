"""A cheap HTTP/1.1 load client for the frontend scale-out sweep.

aiohttp spends 0.25-0.45 ms of CPU on each request it sends (as much as the frontend under
test), so at N=6-8 frontend processes the load clients alone kept 2.5-3.6 CPUs busy beside
the frontends they were measuring. This client sends one fixed POST over keep-alive
connections from `asyncio.Protocol` callbacks (no task, no coroutine per request), parses
only what the sweep reads (status, Content-Length or chunked framing, which frontend process
answered) and sends the next request from the callback that completed the last one.

    outcome = await drive_raw("http://127.0.0.1:8000/v1/chat/completions", body,
                              concurrency=64, count=20000, stream=True)

A body holding `NUMBER_MARK` is sent with it replaced by a number no other request of the run
had (`numbered_requests`): a new prompt each request, as new users' (the sweep's
`--new-prompts`: the workers' KV events then carry every prompt's blocks to every frontend).

A request counts when its whole answer has arrived; a non-200 answer or a closed connection
fails the run (RuntimeError naming what came back). Streams must end with `data: [DONE]`.

Several frontend processes share one port (SO_REUSEPORT), and the kernel spreads connections
by a hash: 64 connections over 6 processes landed 21-44 on one each, so "the same load on
each process" was ±40 %. With `balance_over=N` each connection first asks `GET /health` (a
several-process frontend names the process that answered, `"process": i`; far cheaper than
a chat request, and not counted) and is kept only while that process has fewer than
concurrency/N connections.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import orjson

PROCESS_HEADER = b"x-hpcserve-frontend"  # which of several frontend processes answered
_DONE = b"data: [DONE]"


@dataclass
class Outcome:
    """What one client saw: each request's latency, the wall seconds of the whole run (and
    when it started and ended, for the union of several clients' runs), SSE events received
    (streams), its own CPU seconds, and per frontend process the requests it answered and the
    connections (by index) that carried them."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    started_at: float = 0.0  # time.monotonic() (one clock for every process of the machine)
    ended_at: float = 0.0
    events: int = 0
    cpu_s: float = 0.0
    per_process: dict[str, int] = field(default_factory=dict)
    connections: dict[str, set[int]] = field(default_factory=dict)


class ResponseParser:
    """One HTTP/1.1 response at a time, fed as bytes arrive; `feed` returns True once the
    response is complete (then `status`, `process` and `body` hold it; `reset` readies the
    next). Knows Content-Length and chunked bodies: what a FastAPI/uvicorn frontend sends."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.process: str | None = None
        self.body = bytearray()
        self._head_done = False
        self._length: int | None = None  # Content-Length; None while chunked
        self._chunk_left = 0  # chunked: payload bytes of the current chunk still to come

    def feed(self, data: bytes) -> bool:
        self._buffer += data
        if not self._head_done and not self._parse_head():
            return False
        if self._length is not None:
            if len(self._buffer) < self._length:
                return False
            self.body += self._buffer[: self._length]
            del self._buffer[: self._length]
            return True
        return self._parse_chunks()

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buffer[:end]).lower()
        del self._buffer[: end + 4]
        self.status = int(head[9:12])
        self._head_done = True
        at = head.find(PROCESS_HEADER + b":")
        if at >= 0:
            value_end = head.find(b"\r\n", at)
            value = head[at + len(PROCESS_HEADER) + 1 : value_end if value_end >= 0 else None]
            self.process = value.strip().decode()
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            value_end = head.find(b"\r\n", at + 2)
            self._length = int(head[at + 17 : value_end if value_end >= 0 else None])
        elif b"chunked" not in head:
            raise RuntimeError(f"response without Content-Length or chunked body: {head[:300]!r}")
        return True

    def _parse_chunks(self) -> bool:
        """Moves whole chunk payloads into `body`; True at the zero-size last chunk."""
        buffer = self._buffer
        while True:
            if self._chunk_left:
                if len(buffer) < self._chunk_left + 2:  # payload and its CRLF
                    return False
                self.body += buffer[: self._chunk_left]
                del buffer[: self._chunk_left + 2]
                self._chunk_left = 0
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return False  # the empty trailer's CRLF still to come
                del buffer[: trailer_end + 4]
                return True
            del buffer[: line_end + 2]
            self._chunk_left = size


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending `request` (or what `request()` makes, each time)
    again as soon as each answer is whole, while the shared budget (`take`) gives it another."""

    def __init__(
        self,
        index: int,
        request: bytes | Callable[[], bytes],
        stream: bool,
        take: Callable[[], bool],
        outcome: Outcome,
        finished: asyncio.Future[None],
    ) -> None:
        self._index = index
        self._request = request
        self._stream = stream
        self._take = take
        self._outcome = outcome
        self._finished = finished
        self._parser = ResponseParser()
        self._transport: asyncio.Transport | None = None
        self._sent_at = 0.0
        self._waiting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._send_next()

    def _send_next(self) -> None:
        if not self._take():
            self._waiting = False
            self._done(None)
            return
        self._waiting = True
        self._sent_at = time.perf_counter()
        assert self._transport is not None
        request = self._request
        self._transport.write(request if isinstance(request, bytes) else request())

    def data_received(self, data: bytes) -> None:
        try:
            complete = self._parser.feed(data)
        except (ValueError, RuntimeError) as exc:
            self._done(RuntimeError(f"unreadable answer: {exc}"))
            return
        if not complete:
            return
        parser = self._parser
        outcome = self._outcome
        if parser.status != 200:
            self._done(RuntimeError(f"HTTP {parser.status}: {bytes(parser.body[:300])!r}"))
            return
        if self._stream:
            if not parser.body.rstrip().endswith(_DONE):
                tail = bytes(parser.body[-200:])
                self._done(RuntimeError(f"stream did not end with [DONE]: {tail!r}"))
                return
            outcome.events += parser.body.count(b"data: ")
        outcome.latencies.append(time.perf_counter() - self._sent_at)
        if parser.process is not None:
            process = parser.process
            outcome.per_process[process] = outcome.per_process.get(process, 0) + 1
            outcome.connections.setdefault(process, set()).add(self._index)
        parser.reset()
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting:
            self._done(RuntimeError(f"connection {self._index} closed mid-request: {exc}"))

    def _done(self, error: Exception | None) -> None:
        self._waiting = False
        if self._transport is not None:
            self._transport.close()
        if not self._finished.done():
            if error is None:
                self._finished.set_result(None)
            else:
                self._finished.set_exception(error)


def request_bytes(url: str, body: bytes) -> tuple[str, int, bytes]:
    """(host, port, the whole HTTP/1.1 POST of `body` to `url`'s path)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"http_load: only plain http://host:port/path URLs, not {url!r}")
    port = parts.port or 80
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return parts.hostname, port, head.encode() + body


NUMBER_MARK = b"@@n@@"  # in a body: replaced by a number no other request of the run had


def numbered_requests(request: bytes, tag: str) -> Callable[[], bytes]:
    """Each call: `request` (a whole POST from `request_bytes`) with its body's
    `NUMBER_MARK` replaced by `tag`-k for the k-th call, Content-Length to match: a new
    prompt every request (`tag` tells client processes apart)."""
    head, _, body = request.partition(b"\r\n\r\n")
    head = head[: head.lower().index(b"content-length:")] + b"Content-Length: "
    before, mark, after = body.partition(NUMBER_MARK)
    if not mark:
        raise ValueError(f"numbered_requests: the body has no {NUMBER_MARK!r}")
    fixed = len(before) + len(after)
    numbers = itertools.count()
    prefix = tag.encode() + b"-"

    def make() -> bytes:
        number = prefix + str(next(numbers)).encode()
        return b"%s%d\r\n\r\n%s%s%s" % (head, fixed + len(number), before, number, after)

    return make


def health_request(host: str, port: int) -> bytes:
    """The `GET /health` that tells which frontend process holds a connection."""
    return f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


async def _answered_by(sock: socket.socket, request: bytes) -> str:
    """Send `health_request` on `sock`, read the whole answer: the frontend process that sent
    it (its `"process"`)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request)
    parser = ResponseParser()
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise RuntimeError("connection closed before its first answer")
        if parser.feed(data):
            break
    if parser.status != 200:
        raise RuntimeError(f"/health: HTTP {parser.status}: {bytes(parser.body[:300])!r}")
    process = orjson.loads(parser.body).get("process")
    if process is None:
        raise RuntimeError(f"/health names no process: cannot balance: {bytes(parser.body)!r}")
    return str(process)


async def balanced_sockets(
    host: str, port: int, concurrency: int, processes: int, only: str | None = None
) -> list[socket.socket]:
    """`concurrency` connected sockets, concurrency/processes to each frontend process (known
    by its answer to `health_request` on the socket); the surplus closed. With `only` (a
    process index), all `concurrency` to that one process (the others idle).
    ValueError where concurrency is no multiple of processes; RuntimeError where 20 x
    concurrency connections did not reach the balance (a process that never answers)."""
    if concurrency % processes and only is None:
        raise ValueError(f"balance_over: {concurrency} connections do not split over "
                         f"{processes} processes")  # fmt: skip
    loop = asyncio.get_running_loop()
    request = health_request(host, port)
    each = concurrency // processes if only is None else concurrency
    kept: dict[str, list[socket.socket]] = {}
    tries = 0
    try:
        while sum(len(socks) for socks in kept.values()) < concurrency:
            tries += 1
            if tries > 20 * concurrency:
                seen = {process: len(socks) for process, socks in kept.items()}
                raise RuntimeError(f"balance_over={processes}: after {tries - 1} connections "
                                   f"still {seen} of {each} each")  # fmt: skip
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await loop.sock_connect(sock, (host, port))
                process = await _answered_by(sock, request)
            except BaseException:
                sock.close()
                raise
            mine = kept.setdefault(process, [])
            if len(mine) < each and only in (None, process):
                mine.append(sock)
            else:
                sock.close()
    except BaseException:
        for socks in kept.values():
            for sock in socks:
                sock.close()
        raise
    return [sock for socks in kept.values() for sock in socks]


async def drive_raw(
    url: str,
    body: bytes,
    concurrency: int,
    count: int,
    stream: bool,
    balance_over: int = 0,
    start_at: float | None = None,
    only: str | None = None,
) -> Outcome:
    """`count` POSTs of `body` to `url`, `concurrency` connections each with one in flight;
    with `balance_over` > 1, as many connections to each of that many frontend processes
    (`balanced_sockets`, before the clock starts), or with `only` all to that one of them;
    a `body` holding `NUMBER_MARK` is numbered
    anew each request (`numbered_requests`). `start_at` (time.monotonic()): the first
    request waits for it, so that several client processes, each connecting and balancing
    at its own pace, send their load together (a client late for it starts at once)."""
    host, port, whole = request_bytes(url, body)
    request: bytes | Callable[[], bytes] = whole
    if NUMBER_MARK in body:  # a new prompt each request, numbered apart from other clients'
        request = numbered_requests(whole, str(os.getpid()))
    loop = asyncio.get_running_loop()
    socks: list[socket.socket | None] = [None] * concurrency
    if balance_over > 1:
        socks = list(await balanced_sockets(host, port, concurrency, balance_over, only))
    if start_at is not None and start_at > time.monotonic():
        await asyncio.sleep(start_at - time.monotonic())
    outcome = Outcome()
    remaining = count

    def take() -> bool:
        nonlocal remaining
        if remaining <= 0:
            return False
        remaining -= 1
        return True

    cpu0 = time.process_time()
    finished = [loop.create_future() for _ in range(concurrency)]
    outcome.started_at = time.monotonic()
    t0 = time.perf_counter()
    transports = []
    try:
        for index, done in enumerate(finished):
            factory = partial(_Connection, index, request, stream, take, outcome, done)
            sock = socks[index]
            if sock is None:
                transport, _ = await loop.create_connection(factory, host, port)
            else:
                transport, _ = await loop.create_connection(factory, sock=sock)
            transports.append(transport)
        await asyncio.gather(*finished)
    finally:
        for transport in transports:
            transport.close()
    outcome.wall_s = time.perf_counter() - t0
    outcome.ended_at = time.monotonic()
    outcome.cpu_s = time.process_time() - cpu0
    return outcome


def run_raw(
    url: str,
    body: bytes,
    concurrency: int,
    count: int,
    stream: bool,
    balance_over: int = 0,
    start_at: float | None = None,
    only: str | None = None,
) -> Outcome:
    """`drive_raw` in a fresh event loop (uvloop where installed): a client process's entry."""
    run = drive_raw(url, body, concurrency, count, stream, balance_over, start_at, only)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run)
    return uvloop.run(run)

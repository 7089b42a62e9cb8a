"""benchmarks/http_load.py: the sweep's cheap load client, against a real HTTP server."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from benchmarks.http_load import (
    NUMBER_MARK,
    ResponseParser,
    balanced_sockets,
    drive_raw,
    request_bytes,
)

PLAIN = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n"
SSE_EVENTS = [b'data: {"i": 0}\n\n', b'data: {"i": 1}\n\n', b"data: [DONE]\n\n"]


def chunked(payloads: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"


STREAMED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nX-Hpcserve-Frontend: 3\r\n"
    b"transfer-encoding: chunked\r\n\r\n" + chunked(SSE_EVENTS)
)


def feed_in_pieces(parser: ResponseParser, data: bytes, size: int) -> list[bool]:
    return [parser.feed(data[i : i + size]) for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_parser_content_length_whatever_the_pieces(size: int) -> None:
    parser = ResponseParser()
    done = feed_in_pieces(parser, PLAIN + b"X-Hpcserve-Frontend: 1\r\n\r\n" + b'{"ok":true}', size)
    assert done[-1] and not any(done[:-1])
    assert (parser.status, parser.process, bytes(parser.body)) == (200, "1", b'{"ok":true}')


@pytest.mark.parametrize("size", [1, 3, 16, 5000])
def test_parser_chunked_whatever_the_pieces(size: int) -> None:
    """The whole stream is one response: complete only at the zero-size chunk's blank line,
    the payloads joined without their framing; two answers back to back parse in turn."""
    parser = ResponseParser()
    done = feed_in_pieces(parser, STREAMED + STREAMED[:size], size)
    assert done.count(True) == 1
    assert parser.status == 200 and parser.process == "3"
    assert bytes(parser.body) == b"".join(SSE_EVENTS)
    parser.reset()
    assert parser.feed(STREAMED[size:])
    assert bytes(parser.body) == b"".join(SSE_EVENTS)


def test_parser_refuses_a_body_without_framing() -> None:
    with pytest.raises(RuntimeError, match="without Content-Length"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello")


def test_request_bytes() -> None:
    host, port, request = request_bytes("http://127.0.0.1:8123/v1/chat/completions", b"{}")
    assert (host, port) == ("127.0.0.1", 8123)
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert request.endswith(b"Content-Length: 2\r\n\r\n{}")
    with pytest.raises(ValueError, match="plain http"):
        request_bytes("https://example.org/x", b"{}")


class Server:
    """A real asyncio HTTP/1.1 server answering each POST with `answer(index)`: requests
    counted, each connection's requests read whole (headers and Content-Length body); with
    `label`, each connection's answers (and its GET /health's "process") name the frontend
    process `label(connection number)`, as if several processes shared the port."""

    def __init__(self, answer, label=None) -> None:  # type: ignore[no-untyped-def]
        self.answer = answer
        self.label = label
        self.requests = 0
        self.health = 0  # GET /health answered
        self.connections = 0
        self.bodies: list[bytes] = []  # each POST's body, as read by its Content-Length

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        process = None if self.label is None else self.label(self.connections)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /health "):  # a several-process frontend's answer
                    self.health += 1
                    body = b'{"status": "ok", "process": %s}' % (process or "null").encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))  # fmt: skip
                    continue
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                self.bodies.append(await reader.readexactly(length))
                self.requests += 1
                answer = self.answer(self.requests)
                if process is not None:
                    answer = answer.replace(b"\r\n\r\n", b"\r\nX-Hpcserve-Frontend: %s\r\n\r\n"
                                            % process.encode(), 1)  # fmt: skip
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serve(answer, label=None):  # type: ignore[no-untyped-def]
    server = Server(answer, label)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    return server, listening, f"http://127.0.0.1:{port}/v1/chat/completions"


async def test_drive_counts_every_answer_and_which_process_sent_it() -> None:
    def answer(index: int) -> bytes:
        return STREAMED.replace(b"Frontend: 3", b"Frontend: %d" % (index % 2))

    server, listening, url = await serve(answer)
    async with listening:
        outcome = await drive_raw(url, b'{"stream": true}', concurrency=4, count=101, stream=True)
    assert server.requests == 101 and server.connections == 4
    assert len(outcome.latencies) == 101 and all(t > 0 for t in outcome.latencies)
    assert outcome.events == 3 * 101
    assert sum(outcome.per_process.values()) == 101 and set(outcome.per_process) == {"0", "1"}
    assert set().union(*outcome.connections.values()) <= {0, 1, 2, 3}
    assert outcome.wall_s > 0 and outcome.cpu_s >= 0


async def test_drive_fails_on_an_error_status() -> None:
    def answer(index: int) -> bytes:
        if index == 5:
            return b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"
        return PLAIN + b"\r\n" + b'{"ok":true}'

    _, listening, url = await serve(answer)
    async with listening:
        with pytest.raises(RuntimeError, match="HTTP 503"):
            await drive_raw(url, b"{}", concurrency=2, count=50, stream=False)


async def test_drive_fails_on_a_stream_without_done() -> None:
    def answer(_index: int) -> bytes:
        return STREAMED.replace(chunked(SSE_EVENTS), chunked(SSE_EVENTS[:2]))

    _, listening, url = await serve(answer)
    async with listening:
        with pytest.raises(RuntimeError, match=r"did not end with \[DONE\]"):
            await drive_raw(url, b"{}", concurrency=1, count=3, stream=True)


def plain(_index: int) -> bytes:
    return PLAIN + b"\r\n" + b'{"ok":true}'


async def test_balanced_connections_even_where_the_kernel_is_not() -> None:
    """Two of every three connections land on process "1": balanced over 2 processes, the 6
    connections are 3 and 3 (the surplus closed, their first requests not counted) and the
    requests split about evenly (each connection keeps one in flight); only chat requests
    count, /health asked once a connection."""
    server, listening, url = await serve(plain, lambda n: "0" if n % 3 == 0 else "1")
    async with listening:
        outcome = await drive_raw(url, b"{}", concurrency=6, count=600, stream=False,
                                  balance_over=2)  # fmt: skip
    assert {p: len(c) for p, c in outcome.connections.items()} == {"0": 3, "1": 3}
    assert 250 <= outcome.per_process["0"] <= 350 and sum(outcome.per_process.values()) == 600
    assert server.connections > 6 and server.requests == 600
    assert server.health == server.connections
    # unbalanced, the same server gives process "1" two connections of three
    _, listening, url = await serve(plain, lambda n: "0" if n % 3 == 0 else "1")
    async with listening:
        outcome = await drive_raw(url, b"{}", concurrency=6, count=600, stream=False)
    assert {p: len(c) for p, c in outcome.connections.items()} == {"0": 2, "1": 4}


async def test_balance_refuses_what_cannot_be_balanced() -> None:
    _, listening, url = await serve(plain, lambda _n: "0")  # one process only ever answers
    async with listening:
        host, port, _ = request_bytes(url, b"{}")
        with pytest.raises(ValueError, match="do not split"):
            await balanced_sockets(host, port, 5, 2)
        with pytest.raises(RuntimeError, match=r"after 40 connections still \{'0': 1\}"):
            await balanced_sockets(host, port, 2, 2)
    _, listening, url = await serve(plain)  # one process: /health names none
    async with listening:
        host, port, _ = request_bytes(url, b"{}")
        with pytest.raises(RuntimeError, match="names no process"):
            await balanced_sockets(host, port, 2, 2)


async def test_drive_waits_for_its_start_time_and_records_its_window() -> None:
    """The first request goes at `start_at`, not before (client processes start together);
    the run's window is recorded on the one clock every process reads."""
    server, listening, url = await serve(plain)
    async with listening:
        start_at = time.monotonic() + 0.3
        outcome = await drive_raw(url, b"{}", concurrency=2, count=20, stream=False,
                                  start_at=start_at)  # fmt: skip
    assert server.requests == 20
    assert start_at <= outcome.started_at < outcome.ended_at <= time.monotonic()
    assert outcome.ended_at - outcome.started_at >= outcome.wall_s * 0.9


async def test_a_marked_body_is_a_new_prompt_each_request() -> None:
    """A body holding NUMBER_MARK goes out numbered anew each request, its Content-Length
    right for each (the server reads exactly each body and the next request after it)."""
    server, listening, url = await serve(plain)
    body = b'{"messages": [{"content": "' + NUMBER_MARK + b' why is the sky blue"}]}'
    async with listening:
        outcome = await drive_raw(url, body, concurrency=3, count=120, stream=False)
    assert len(outcome.latencies) == 120 and len(server.bodies) == 120
    assert len(set(server.bodies)) == 120  # no two alike
    for sent in server.bodies:
        assert NUMBER_MARK not in sent and sent.endswith(b' why is the sky blue"}]}')
        assert orjson.loads(sent)["messages"][0]["content"].split()[0].count("-") == 1

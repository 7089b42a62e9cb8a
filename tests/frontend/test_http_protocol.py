"""`frontend.http_protocol`: a response's head goes out with its first body write.

A real uvicorn server (the frontend's protocol class) on a free port, a raw socket client.
The app sends the head, then waits until the test has looked at the socket: with uvicorn's
own protocol the head is already readable there (written on `http.response.start`); with
`HeadWithBodyProtocol` nothing is, until the body is sent with it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from contract.readiness import free_port, port_open
from frontend.http_protocol import HeadWithBodyProtocol

BODY = b'{"ok": true}'


class App:
    """Sends the head, says so, waits for the test's go, then the body (if any)."""

    def __init__(self) -> None:
        self.head_sent = threading.Event()
        self.go = threading.Event()

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.head_sent.set()
        await asyncio.to_thread(self.go.wait, 30)
        await send({"type": "http.response.body", "body": BODY})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, App]]:
    app = App()
    port = free_port("127.0.0.1")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=HeadWithBodyProtocol,
                            lifespan="off", access_log=False, log_level="warning")  # fmt: skip
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(uv.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not port_open("127.0.0.1", port):
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not come up"
        time.sleep(0.02)
    try:
        yield port, app
    finally:
        uv.should_exit = True
        thread.join(30)


def _read_response(sock: socket.socket, head_only: bool = False) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"connection closed after {data!r}"
        data += part
    if head_only:
        return data
    while not data.endswith(BODY):
        part = sock.recv(65536)
        assert part, f"connection closed after {data!r}"
        data += part
    return data


def _exchange(port: int, app: App, request: bytes, body: bytes = b"") -> tuple[bool, bytes]:
    """(whether anything was readable while the app held its body back, the response)."""
    app.head_sent.clear()
    app.go.clear()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if b"100-continue" in request:
            interim = _read_response(sock, head_only=True)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
        assert app.head_sent.wait(30)
        readable, _, _ = select.select([sock], [], [], 0)  # loopback: a write is there at once
        app.go.set()
        return bool(readable), _read_response(sock)


def test_the_head_waits_for_the_body_and_goes_out_with_it(server: tuple[int, App]) -> None:
    port, app = server
    readable, response = _exchange(
        port, app, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    )
    assert not readable, "the head was written before the body"
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"content-length: 12" in head
    assert body == BODY


def test_keep_alive_requests_each_get_their_head(server: tuple[int, App]) -> None:
    port, app = server
    request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for _ in range(3):
            app.head_sent.clear()
            app.go.set()
            sock.sendall(request)
            response = _read_response(sock)
            assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(BODY)
            assert response.count(b"HTTP/1.1") == 1


def test_a_100_continue_is_not_held(server: tuple[int, App]) -> None:
    """The interim response is written before the response starts: the client gets it
    (and only then sends its body), the final head still waits for the body."""
    port, app = server
    request = (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
    )
    readable, response = _exchange(port, app, request, body=b"{}")
    assert not readable
    assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(BODY)

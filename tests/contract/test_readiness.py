"""Readiness probes against a real HTTP server on a free loopback port."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from contract.readiness import http_ok, http_ok_from


class _Health(BaseHTTPRequestHandler):
    """/health as one frontend process of several answers it (status and body set per test)."""

    status = 200
    body: object = {"status": "ok", "workers": 1, "process": 1}

    def do_GET(self) -> None:
        payload = json.dumps(self.body).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def health_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health"
    finally:
        server.shutdown()
        server.server_close()
        _Health.status, _Health.body = 200, {"status": "ok", "workers": 1, "process": 1}


def test_a_process_is_ready_only_when_it_answers_itself(health_url: str) -> None:
    assert http_ok(health_url)
    assert http_ok_from(health_url, 1)
    assert not http_ok_from(health_url, 0)  # a sibling's answer: not this one's readiness


def test_no_process_field_or_an_error_status_is_not_ready(health_url: str) -> None:
    _Health.body = {"status": "ok", "workers": 1}  # a single-process frontend's body
    assert not http_ok_from(health_url, 0)
    _Health.status, _Health.body = 503, {"status": "no workers", "workers": 0, "process": 0}
    assert not http_ok_from(health_url, 0)
    _Health.status, _Health.body = 200, ["not", "an", "object"]
    assert not http_ok_from(health_url, 0)


def test_nothing_listening_is_not_ready() -> None:
    from contract.readiness import free_port

    assert not http_ok_from(f"http://127.0.0.1:{free_port('127.0.0.1')}/health", 0)


def test_a_process_found_among_siblings_within_one_poll(health_url: str) -> None:
    """Each connection lands on any process: one poll tries fresh connections until one
    reaches the process asked for (here every fourth answer is process 3's)."""
    calls = 0
    original = _Health.do_GET

    def rotate(self: _Health) -> None:
        nonlocal calls
        _Health.body = {"status": "ok", "workers": 1, "process": calls % 4}
        calls += 1
        original(self)

    _Health.do_GET = rotate  # type: ignore[method-assign]
    try:
        assert http_ok_from(health_url, 3)
        assert 1 < calls <= 32
        calls = 0
        assert not http_ok_from(health_url, 7, attempts=8)  # no such process
        assert calls == 8
    finally:
        _Health.do_GET = original  # type: ignore[method-assign]


def test_free_ports_are_outside_the_ephemeral_range_and_differ() -> None:
    """An ephemeral port could be taken by any outgoing connection before its service binds
    it; several ports chosen before any is bound must differ."""
    from contract.readiness import ephemeral_ports, free_port

    ephemeral = ephemeral_ports()
    ports = [free_port("127.0.0.1") for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if port in ephemeral], (ports, ephemeral)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[0]))  # free indeed

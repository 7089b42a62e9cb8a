"""Readiness probes shared by the local launcher and the Slurm batch script (stdlib only).

Port open, HTTP health, and the number of keys under an etcd prefix (registered workers),
read through etcd's JSON gateway so that no gRPC client is needed in a batch shell; one
key's create revision and its deletion (the supervisor's view of a restarted worker).
Also `free_port`, how both pick ports for the services they start.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

PROBE_ERRORS = (urllib.error.URLError, OSError, ValueError)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when `host:port` accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except PROBE_ERRORS:
        return False


def http_ok_from(url: str, process: int, timeout: float = 2.0, attempts: int = 32) -> bool:
    """True when GET `url` answers 2xx with `"process": process` in its JSON body: one of
    several processes sharing a port (SO_REUSEPORT) is ready only once it answers itself,
    not when a sibling does. Each GET is a new connection, which the kernel hands to any
    listening process, so up to `attempts` of them (within `timeout` in all) are made, or
    a poll would find one process of eight once in eight tries."""
    deadline = time.monotonic() + timeout
    for _ in range(attempts):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            with urllib.request.urlopen(url, timeout=remaining) as response:
                if not 200 <= response.status < 300:
                    return False
                body = json.loads(response.read())
        except PROBE_ERRORS:
            return False
        if isinstance(body, dict) and body.get("process") == process:
            return True
    return False


def etcd_key_count(endpoint: str, prefix: str, timeout: float = 2.0) -> int:
    """Keys under `prefix`, through etcd's JSON gateway (no gRPC client needed)."""
    key = prefix.encode()
    range_end = key[:-1] + bytes([key[-1] + 1])
    body = {
        "key": base64.b64encode(key).decode(),
        "range_end": base64.b64encode(range_end).decode(),
        "count_only": True,
    }
    return int(_etcd_call(endpoint, "/v3/kv/range", body, timeout).get("count", 0))


def _etcd_call(endpoint: str, path: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        endpoint.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def etcd_key_revision(endpoint: str, key: str, timeout: float = 2.0) -> int | None:
    """The create revision of exactly `key` (None: absent). A worker that registers again
    after a restart has a new one, however its stale key from before lingered."""
    body = {"key": base64.b64encode(key.encode()).decode(), "keys_only": True}
    kvs = _etcd_call(endpoint, "/v3/kv/range", body, timeout).get("kvs") or []
    return int(kvs[0]["create_revision"]) if kvs else None


def etcd_delete_key(endpoint: str, key: str, timeout: float = 2.0) -> bool:
    """Delete exactly `key`; True when it was there. The supervisor drops a dead worker's
    registration at once instead of waiting for its lease to lapse."""
    body = {"key": base64.b64encode(key.encode()).decode()}
    return int(_etcd_call(endpoint, "/v3/kv/deleterange", body, timeout).get("deleted", 0)) > 0


def keys_registered(endpoint: str, prefix: str, count: int = 1) -> Callable[[], bool]:
    """A check: at least `count` keys under `prefix` (False while etcd is unreachable)."""

    def registered() -> bool:
        try:
            return etcd_key_count(endpoint, prefix) >= count
        except PROBE_ERRORS:
            return False

    return registered


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

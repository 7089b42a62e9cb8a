"""Readiness probes shared by the local launcher and the Slurm batch script (stdlib only).

Port open, HTTP health, and the number of keys under an etcd prefix (registered workers),
read through etcd's JSON gateway so that no gRPC client is needed in a batch shell; one
key's create revision and its deletion (the supervisor's view of a restarted worker).
Also `free_port`, how both pick ports for the services they start.
"""

from __future__ import annotations

import base64
import json
import random
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


# free_port's ports: from here up, outside the kernel's ephemeral range (the ports below are
# where services listen by custom: 8000, 6817-6818 of Slurm, 2379 of etcd, 4222 of NATS).
FIRST_FREE_PORT = 10000
_handed_out: set[int] = set()  # ports this process chose; their services may not listen yet


def ephemeral_ports() -> range:
    """The ports the kernel hands out for bind(0) and outgoing connections (this network
    namespace's ip_local_port_range; elsewhere a range holding Linux's and macOS's)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            low, high = (int(part) for part in file.read().split())
    except (OSError, ValueError):
        low, high = 32768, 65535
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, outside the ephemeral range, never the same one
    twice in this process.

    Why: the service that gets it binds it later (seconds later in a Slurm step). A port the
    OS picks (bind to 0) is an ephemeral one, which any process's next outgoing connection
    or bind(0) may take meanwhile: an etcd peer port was taken so while a job's srun steps
    started. Outside that range only a process that asks for that very port can take it.
    """
    ephemeral = ephemeral_ports()
    below = range(FIRST_FREE_PORT, max(FIRST_FREE_PORT, ephemeral.start))
    above = range(max(FIRST_FREE_PORT, ephemeral.stop), 65536)
    outside, pick = len(below) + len(above), random.SystemRandom()
    for _ in range(100 if outside else 0):
        at = pick.randrange(outside)
        port = below[at] if at < len(below) else above[at - len(below)]
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:  # taken
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no such range here
        sock.bind((host, 0))
        return sock.getsockname()[1]

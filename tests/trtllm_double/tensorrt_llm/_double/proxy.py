"""The double's stand-in for the MPI comm session the real LLM opens under
trtllm-llmapi-launch (`RemoteMpiCommSessionClient` <-> `mgmn_leader_node`).

Why: under `srun --mpi=pmix` / `mpirun`, the command runs with its MPI variables removed and
reaches the MPI world only through the leader on rank 0 at TLLM_SPAWN_PROXY_PROCESS_IPC_ADDR.
The real protocol is ZeroMQ + pickle + HMAC; the double uses JSON lines over TCP, each signed
with HMAC-SHA256 under TLLM_SPAWN_PROXY_PROCESS_IPC_HMAC_KEY: `hello` (-> world size and each
rank's host) and `shutdown` (-> the leader tells the workers to exit).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import time
from typing import Any

ENV_SPAWN = "TLLM_SPAWN_PROXY_PROCESS"
ENV_ADDR = "TLLM_SPAWN_PROXY_PROCESS_IPC_ADDR"
ENV_KEY = "TLLM_SPAWN_PROXY_PROCESS_IPC_HMAC_KEY"
ENV_CONNECT_TIMEOUT = "TLLM_DOUBLE_CONNECT_TIMEOUT_S"


def spawn_proxy_requested() -> bool:
    return os.environ.get(ENV_SPAWN, "0") == "1"


def parse_addr(addr: str) -> tuple[str, int]:
    if not addr.startswith("tcp://") or ":" not in addr[6:]:
        raise ValueError(f"{ENV_ADDR} must look like tcp://host:port, got {addr!r}")
    host, port = addr[6:].rsplit(":", 1)
    return host.strip("[]"), int(port)


def key_bytes(key: str) -> bytes:
    try:
        return bytes.fromhex(key)
    except ValueError:
        return key.encode()


def encode(body: dict[str, Any], key: bytes) -> bytes:
    payload = json.dumps(body, sort_keys=True)
    mac = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    return (json.dumps({"body": payload, "mac": mac}) + "\n").encode()


def decode(line: bytes, key: bytes) -> dict[str, Any]:
    message = json.loads(line)
    payload = message["body"]
    mac = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, str(message.get("mac", ""))):
        raise ValueError(f"message HMAC does not verify (wrong {ENV_KEY})")
    body = json.loads(payload)
    if not isinstance(body, dict):
        raise ValueError("message body is not an object")
    return body


class LeaderClient:
    """The LLM's connection to the MPI leader (kept open for the LLM's lifetime)."""

    def __init__(self, addr: str, key: str, timeout: float) -> None:
        self.addr = addr
        self._key = key_bytes(key)
        host, port = parse_addr(addr)
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            try:
                self._sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError as exc:
                last = exc
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"could not reach the MPI leader at {addr} within {timeout:g} s "
                        f"({last}); is the command running under trtllm-llmapi-launch?"
                    ) from exc
                time.sleep(0.1)
        self._sock.settimeout(max(timeout, 5.0))
        self._reader = self._sock.makefile("rb")

    def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        self._sock.sendall(encode(body, self._key))
        line = self._reader.readline()
        if not line:
            raise RuntimeError(f"the MPI leader at {self.addr} closed the connection")
        reply = decode(line, self._key)
        if reply.get("error"):
            raise RuntimeError(f"the MPI leader refused {body.get('op')}: {reply['error']}")
        return reply

    def hello(self) -> dict[str, Any]:
        return self._call({"op": "hello", "pid": os.getpid()})

    def shutdown(self) -> None:
        try:
            self._call({"op": "shutdown"})
        except (OSError, RuntimeError, ValueError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._reader.close()
            self._sock.close()
        except OSError:
            pass

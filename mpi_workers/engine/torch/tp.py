"""torch.distributed for one tensor-parallel group: rendezvous over MPI, collectives, step plans.

Rank 0 opens a TCPStore on a free port of its host and shares the address by MPI broadcast
(no fixed ports). The data group (gloo on CPU, NCCL on GPU) carries all-reduces and the
logits gather with a bounded timeout; a separate gloo group with a long timeout carries the
leader's pickled step plans, so idle followers block in a socket read (no MPI busy-polling)
and a dead peer surfaces as an error (closed connection) instead of a hang.
Only torch and mpi4py are imported here: the GPU benchmark uses this module as is.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import socket
import struct
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mpi_workers.engine.torch.layers import TpGroup

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("HPCSERVE_TP_TIMEOUT_S", "120"))
CONTROL_TIMEOUT = timedelta(days=7)  # followers wait this long for the next step
HEAD_BYTES = 16384  # one control broadcast carries plans up to this size


def node_name() -> str:
    """This rank's node. Slurm's name first: nodes may share one hostname (containers, the
    network-namespace test cluster), and only SLURMD_NODENAME tells them apart."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def rendezvous_host(comm: Any) -> str:
    """Loopback when the group shares one node, else this node's address (override:
    HPCSERVE_TP_HOST on rank 0)."""
    names = comm.allgather(node_name())
    if len(set(names)) == 1:
        return "127.0.0.1"
    return os.environ.get("HPCSERVE_TP_HOST") or socket.gethostbyname(node_name())


def interface_of(address: str) -> str | None:
    """The local network interface that holds `address` (Linux), or None."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), siocgifaddr, request)
            except OSError:
                continue
            if socket.inet_ntoa(reply[20:24]) == address:
                return name
    return None


def pin_gloo_interface() -> None:
    """Gloo finds its own address by resolving the hostname, which is wrong where nodes share
    one (containers, network namespaces): point it at the interface of this node's address."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        interface = interface_of(socket.gethostbyname(node_name()))
    except OSError:
        return
    if interface is not None and interface != "lo":
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        logger.info("gloo uses interface %s (node %s)", interface, node_name())


class TpRuntime:
    """This rank's tensor-parallel collectives; `group` is what the model layers use."""

    def __init__(self, rank: int, size: int, device: torch.device, control: Any) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self._control = control
        self._head = torch.zeros(HEAD_BYTES, dtype=torch.uint8)
        self.group = TpGroup(rank, size, self.all_reduce, self.gather)

    @classmethod
    def init(cls, comm: Any, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S):
        """Collective over `comm` (an mpi4py communicator of the group's ranks)."""
        rank, size = comm.Get_rank(), comm.Get_size()
        address = None
        store = None
        if rank == 0:
            host = rendezvous_host(comm)
            store = dist.TCPStore(host, 0, size, is_master=True, wait_for_workers=False)
            address = (host, store.port)
        else:
            comm.allgather(node_name())
        host, port = comm.bcast(address, root=0)
        if store is None:
            store = dist.TCPStore(host, port, size, is_master=False)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if host != "127.0.0.1":
            pin_gloo_interface()
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=size,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )  # fmt: skip
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        logger.info("torch.distributed %s group of %d ready via %s:%d", backend, size, host, port)
        return cls(rank, size, device, control)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along the last dim on rank 0; None elsewhere."""
        parts = self.gather_list(x)
        return None if parts is None else torch.cat(parts, dim=-1)

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Rank 0 sends `parts[r]` to rank r (equal shapes, contiguous); every rank's `out`
        receives its part. On the data group: device tensors, the group's bounded timeout."""
        dist.scatter(out, parts if self.rank == 0 else None, src=0)
        return out

    def gather_list(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (equal shapes) on rank 0, in rank order; None elsewhere."""
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.gather(x.contiguous(), parts, dst=0)
            return parts
        dist.gather(x.contiguous(), None, dst=0)
        return None

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends `obj` (pickled) to every rank; each returns it.

        One gloo broadcast of a fixed-size buffer (8-byte length + the start of the payload)
        carries a step plan of a typical decode batch whole; only a larger payload costs a
        second broadcast for the rest (each broadcast is a round trip the step waits for).
        """
        head = self._head
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            n = len(data)
            first = min(n, HEAD_BYTES - 8)
            head[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
            head[8 : 8 + first] = torch.frombuffer(bytearray(data[:first]), dtype=torch.uint8)
        dist.broadcast(head, src=0, group=self._control)
        if self.rank == 0:
            if n > first:
                rest = torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8)
                dist.broadcast(rest, src=0, group=self._control)
            return obj
        n = int(head[:8].view(torch.int64).item())
        data = head[8 : 8 + min(n, HEAD_BYTES - 8)].numpy().tobytes()
        if n > HEAD_BYTES - 8:
            rest = torch.empty(n - (HEAD_BYTES - 8), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self._control)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def close(self) -> None:
        if dist.is_initialized():
            if self.device.type == "cuda":
                # Live CUDA graphs holding NCCL collectives make the destroy below hang.
                from mpi_workers.engine.torch.cuda_graph import release_all

                release_all()
            dist.destroy_process_group()


_LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def local_rank(comm: Any = None) -> int:
    """This rank's index among the ranks on its node (picks its GPU)."""
    for name in _LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    if comm is None:
        return 0
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def pick_device(kind: str, comm: Any) -> torch.device:
    """One GPU per rank by local rank on CUDA; the CPU otherwise."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = local_rank(comm) % max(1, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)

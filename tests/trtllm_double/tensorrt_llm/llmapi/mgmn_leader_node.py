"""TEST DOUBLE of `tensorrt_llm.llmapi.mgmn_leader_node`: rank 0's MPI comm server.

Run by trtllm-llmapi-launch on MPI rank 0 (`python -m tensorrt_llm.llmapi.mgmn_leader_node`)
with the MPI environment intact, while the user's command runs beside it without one. It
gathers every rank's host name over MPI COMM_WORLD, serves the LLM's `hello` on
TLLM_SPAWN_PROXY_PROCESS_IPC_ADDR, and when the LLM shuts down (or disconnects, or this
process gets SIGTERM/SIGINT) it tells the worker ranks to exit so `mpirun`/`srun` ends.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType

EXIT_TAG = 7707
logger = logging.getLogger("tensorrt_llm")
_STOP = threading.Event()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    _STOP.set()


if __name__ == "__main__":  # before MPI starts: a stop request must never kill us half-way
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

from mpi4py import MPI  # noqa: E402

from mpi_workers.mpi_shm import release_segment_names  # noqa: E402
from tensorrt_llm._double import proxy  # noqa: E402


def rank_hostname() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _serve_connection(conn: socket.socket, key: bytes, hello: dict, stop: threading.Event) -> bool:
    """Answer one client; True when the leader should stop (shutdown, or its LLM is gone)."""
    conn.settimeout(0.2)
    buffer, greeted = b"", False
    with conn:
        while not stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return greeted
            if not chunk:
                return greeted
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    body = proxy.decode(line, key)
                except (ValueError, KeyError) as exc:
                    conn.sendall(proxy.encode({"error": str(exc)}, key))
                    return False
                op = body.get("op")
                if op == "hello":
                    greeted = True
                    conn.sendall(proxy.encode(hello, key))
                elif op == "shutdown":
                    conn.sendall(proxy.encode({"ok": True}, key))
                    return True
                else:
                    conn.sendall(proxy.encode({"error": f"unknown op {op!r}"}, key))
    return True


def serve(addr: str, key: bytes, hello: dict, stop: threading.Event) -> None:
    host, port = proxy.parse_addr(addr)
    with socket.create_server((host, port)) as server:
        server.settimeout(0.2)
        logger.info("MPI comm server (double) listening at %s", addr)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            if _serve_connection(conn, key, hello, stop):
                return


def launch_server_main() -> int:
    comm = MPI.COMM_WORLD
    # Test-suite hygiene, not TensorRT-LLM's behaviour: the double's ranks run on the venv's
    # MPICH, whose /dev/shm segment a stopped deployment's killed ranks would leave behind
    # (mpi_workers.mpi_shm); the real one brings its own Open MPI.
    release_segment_names(comm)
    hosts = comm.gather(rank_hostname(), root=0)
    size = comm.Get_size()
    stop = _STOP
    addr = os.environ.get(proxy.ENV_ADDR)
    status = 0
    try:
        if not addr:
            print(f"mgmn_leader_node: {proxy.ENV_ADDR} is not set", file=sys.stderr)
            status = 2
        else:
            key = proxy.key_bytes(os.environ.get(proxy.ENV_KEY, ""))
            serve(addr, key, {"world_size": size, "hosts": hosts}, stop)
    finally:
        for rank in range(1, size):
            comm.send("exit", dest=rank, tag=EXIT_TAG)
    logger.info("MPI comm server (double) stopped")
    return status


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TLLM_LOG_LEVEL", "INFO").upper())
    sys.exit(launch_server_main())

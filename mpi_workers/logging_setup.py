"""Logging for worker processes: every line says which worker, role and MPI rank wrote it.

    2026-11-30 05:00:00,123 INFO [worker agg g0 i0 rank0] mpi_workers.worker: registered ...

A process hosting several simulated workers tags itself `[worker agg g0 i0-3 rank0]`, and
each worker's own tasks (`worker_log_tag` set in their context) `[worker agg g0 i2 rank0]`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys

from contract.plan import instance_span

# The tag of the worker whose task is running, in a process hosting several; None: the
# process's own tag.
worker_log_tag: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "worker_log_tag", default=None
)

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def mpi_rank() -> int:
    """This process's rank as the MPI launcher (mpirun, srun) tells it; 0 when alone."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class TagFilter(logging.Filter):
    """Adds `record.tag` (e.g. `[worker agg g0 i0 rank0]`) to every record it sees."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.tag = worker_log_tag.get() or self.tag
        return True


def worker_tag(role: str, group: int, index: int, rank: int, instances: int = 1) -> str:
    """`[worker ROLE gG iI rankR]`; `iI-J` for a process hosting instances I..J."""
    return f"[worker {role} g{group} {instance_span(index, instances)} rank{rank}]"


def configure_logging(tag: str, level: str | int | None = None) -> None:
    """Send every log line (ours and libraries') to stderr with `tag`; `HPCSERVE_LOG_LEVEL`."""
    level = level or os.environ.get("HPCSERVE_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TagFilter(tag))
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(tag)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)

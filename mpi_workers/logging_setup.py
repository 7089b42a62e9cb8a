"""Logging for worker processes: every line says which worker, role and MPI rank wrote it.

    2026-11-30 05:00:00,123 INFO [worker agg g0 i0 rank0] mpi_workers.worker: registered ...
"""

from __future__ import annotations

import logging
import os
import sys

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
        record.tag = self.tag
        return True


def worker_tag(role: str, group: int, index: int, rank: int) -> str:
    return f"[worker {role} g{group} i{index} rank{rank}]"


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

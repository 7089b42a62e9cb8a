"""Child processes: a restarted one's log holds its earlier runs' lines too, and only this
run's tell why it failed (the supervisor's retry of an MPI world that did not form reads
them)."""

from __future__ import annotations

import sys
from pathlib import Path

from contract.mpirun import mpi_init_failed
from contract.processes import ManagedProcess


def run_to_end(log: Path, text: str) -> ManagedProcess:
    process = ManagedProcess.spawn("p", (sys.executable, "-c", f"print({text!r})"), log)
    process.popen.wait(30)
    return process


def test_the_log_of_this_run_leaves_out_earlier_runs(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    first = run_to_end(log, "Fatal error in internal_Init_thread: Other MPI error")
    assert first.log_of_this_run().strip() == "Fatal error in internal_Init_thread: Other MPI error"
    second = run_to_end(log, "serving")
    assert "internal_Init_thread" in log.read_text() and "serving" in log.read_text()
    assert second.log_of_this_run().strip() == "serving"


def test_the_last_line_is_this_runs_own_and_short(tmp_path: Path) -> None:
    """What the supervisor quotes where it reports an exit: this run's last non-empty line
    (an earlier run's never), cut at max_chars."""
    log = tmp_path / "worker.log"
    first = run_to_end(log, "engine failed: CUDA out of memory\n\n")
    assert first.last_line() == "engine failed: CUDA out of memory"
    second = run_to_end(log, "")
    assert second.last_line() == ""
    third = run_to_end(log, "x" * 500)
    assert third.last_line(max_chars=20) == "x" * 20 + "..."


def test_mpi_init_failures_are_told_from_a_workers_own() -> None:
    mpich = ("Abort(273827087) on node 0: Fatal error in internal_Init_thread: Other MPI error, "
             "error stack:\nMPIDI_UCX_comm_addr_exchange(159): Invalid parameter")  # fmt: skip
    open_mpi = "*** An error occurred in MPI_Init\n*** MPI_INIT has failed"
    assert mpi_init_failed(mpich) and mpi_init_failed(open_mpi)
    own = "RuntimeError: engine.device is cuda but torch sees no CUDA device"
    assert not mpi_init_failed(own) and not mpi_init_failed("")

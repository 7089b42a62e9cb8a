"""MPICH's shared memory of a TP group leaves no name in /dev/shm, however the group ends.

MPICH (pip `mpich` 5.0.2) unlinks `/dev/shm/mpich_shm_*` only in MPI_Finalize, which a crashed
group never reaches; `mpi_workers.mpi_shm` unlinks the name once every local rank maps it.
The integration tests start real 2-rank groups the way the launcher starts a TP group
(`mpi_launcher()` flags, each rank under the rank guard) and SIGKILL them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.processes import ManagedProcess, descendants, pid_alive
from hpcserve.launcher import mpi_launcher
from mpi_workers.mpi_shm import SHM_DIR, mapped_segment_names, slurm_step_tag

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = str(HERE / "shm_script.py")


def test_a_slurm_steps_tag_is_mpichs_hash_of_its_pmi_job_name() -> None:
    assert slurm_step_tag("7", "2") == "16f4724e"  # seen: a failed step 7.2's segments


def test_a_failed_rank_of_a_slurm_step_takes_its_steps_names_out(tmp_path: Path) -> None:
    """A rank (under the guard) that exits non-zero in a Slurm step: the names of that
    step's MPICH segments leave /dev/shm (a rank dying inside MPI_Init left them); another
    step's stay, and a rank that succeeds removes nothing."""
    job = f"test{os.getpid()}"  # no real job has it
    tag, other = slurm_step_tag(job, "3"), slurm_step_tag(job, "4")
    names = [f"mpich_shm_{tag}_0", f"mpich_shm_{tag}_1", f"mpich_vci_{tag}_0",
             f"mpich_shm_{other}_0"]  # fmt: skip
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "3", "PMI_RANK": "1"}
    try:
        for name in names:
            (SHM_DIR / name).write_bytes(b"segment")
        guard = [sys.executable, "-m", "mpi_workers.rank_guard", "-c"]
        ok = subprocess.run([*guard, "pass"], env=env, cwd=REPO, capture_output=True, text=True)
        assert ok.returncode == 0 and all((SHM_DIR / name).exists() for name in names)
        failed = subprocess.run([*guard, "raise SystemExit(3)"], env=env, cwd=REPO,
                                capture_output=True, text=True)  # fmt: skip
        assert failed.returncode == 3
        assert [name for name in names if (SHM_DIR / name).exists()] == [names[3]]
        assert "removed its step's MPICH shared memory names" in failed.stderr
    finally:
        for name in names:
            (SHM_DIR / name).unlink(missing_ok=True)


def test_mapped_names_are_named_mpich_segments_in_dev_shm() -> None:
    maps = "\n".join([
        "7f1c2a000000-7f1c2a306000 rw-s 00000000 00:1a 1201 /dev/shm/mpich_shm_8733be31_0",
        "7f1c2a400000-7f1c2a406000 rw-s 00000000 00:1a 1202 /dev/shm/mpich_vci_8733be31_0",
        "7f1c2b000000-7f1c2b306000 rw-s 00000000 00:1a 1203 /dev/shm/mpich_shm_4c284e2_0 (deleted)",
        "7f1c2c000000-7f1c2c010000 rw-s 00000000 00:1a 1204 /dev/shm/ucx_shm_posix_29134143",
        "7f1c2d000000-7f1c2d010000 rw-s 00000000 00:1a 1205 /tmp/mpich_shm_1_0",
        "7f1c2e000000-7f1c2e1d6000 r-xp 00028000 08:01 3021 /usr/lib/x86_64-linux-gnu/libc.so.6",
        "7ffd5a3c1000-7ffd5a3e2000 rw-p 00000000 00:00 0    [stack]",
        "7f1c2f000000-7f1c2f021000 rw-p 00000000 00:00 0",
    ])  # fmt: skip
    assert mapped_segment_names(maps) == {"mpich_shm_8733be31_0", "mpich_vci_8733be31_0"}
    assert mapped_segment_names(maps, unlinked=True) == {
        "mpich_shm_8733be31_0", "mpich_vci_8733be31_0", "mpich_shm_4c284e2_0",
    }  # fmt: skip


class Group:
    """`mpirun -n 2` of tests/mpi_workers/shm_script.py: each rank reports the MPICH segments
    it maps into `out`, then waits for `out/stop` (and finalizes)."""

    def __init__(self, out: Path, *, release: bool) -> None:
        out.mkdir()
        self.out = out
        argv = [*mpi_launcher(), "-n", "2", sys.executable, "-m", "mpi_workers.rank_guard",
                SCRIPT, str(out), *(["--release"] if release else [])]  # fmt: skip
        self.process = ManagedProcess.spawn(out.name, argv, out / "group.log", cwd=REPO)

    def reports(self, timeout_s: float = 60) -> list[dict]:
        """Both ranks' reports, once written (fails if the group exits first)."""
        files = [self.out / f"rank{rank}.json" for rank in (0, 1)]
        deadline = time.monotonic() + timeout_s
        while not all(f.is_file() for f in files):
            assert self.process.running(), self.process.log_tail()
            assert time.monotonic() < deadline, self.process.log_tail()
            time.sleep(0.05)
        return [json.loads(f.read_text()) for f in files]

    def segments(self) -> set[str]:
        return {name for report in self.reports() for name in report["mapped"]}

    def kill(self) -> None:
        """SIGKILL as a crash would: mpirun, its proxy, the guards and the ranks at once."""
        family = descendants(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.popen.wait(10)
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in family):
            assert time.monotonic() < deadline, "the group outlived SIGKILL"
            time.sleep(0.05)


def named(names: set[str]) -> set[str]:
    return {name for name in names if (SHM_DIR / name).exists()}


@contextlib.contextmanager
def group(out: Path, *, release: bool) -> Iterator[Group]:
    """A group that is stopped, and whose segment names are removed, whatever the test did:
    the test suite itself leaks nothing."""
    started = Group(out, release=release)
    try:
        yield started
    finally:
        started.process.stop(5)
        files = [out / f"rank{rank}.json" for rank in (0, 1)]
        for name in {n for f in files if f.is_file() for n in json.loads(f.read_text())["mapped"]}:
            (SHM_DIR / name).unlink(missing_ok=True)


@pytest.mark.integration
def test_a_killed_group_leaves_no_name_and_another_live_group_keeps_its_own(
    tmp_path: Path,
) -> None:
    with group(tmp_path / "other", release=False) as other:  # as MPICH leaves it
        other_names = other.segments()
        assert other_names and named(other_names) == other_names
        with group(tmp_path / "tp", release=True) as tp:
            names = tp.segments()
            assert names and names.isdisjoint(other_names)
            unlinked = [name for report in tp.reports() for name in report["unlinked"]]
            assert sorted(unlinked) == sorted(names)  # by one rank, once
            assert named(names) == set()  # gone while the group still runs on it
            tp.kill()
            assert named(names) == set()
            assert named(other_names) == other_names  # never another group's
        (other.out / "stop").touch()
        assert other.process.popen.wait(60) == 0
        assert named(other_names) == set()  # MPI_Finalize unlinked its own


@pytest.mark.integration
def test_a_released_group_still_talks_and_finalizes_cleanly(tmp_path: Path) -> None:
    """After the unlink the ranks still share the segment (a barrier over it at the end) and
    MPI_Finalize, whose own unlink now finds no name, exits 0."""
    with group(tmp_path / "tp", release=True) as tp:
        names = tp.segments()
        assert names and named(names) == set()
        (tp.out / "stop").touch()
        assert tp.process.popen.wait(60) == 0, tp.process.log_tail()

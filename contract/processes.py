"""Child processes we start and must stop: spawn with a log file, wait until ready, stop by PID.

Each child leads its own process group, so stopping it also stops whatever it spawned
(uvicorn's workers); MPICH's mpirun puts its ranks in their own groups, so the descendants
seen at stop time are killed too if they outlive it. Readiness is polled, never slept for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A child exited or never became ready; the message ends with its log tail."""


class ManagedProcess:
    def __init__(
        self, name: str, popen: subprocess.Popen[bytes], log_path: Path, log_offset: int = 0
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.log_offset = log_offset  # where this run's output starts (a restart appends)

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log_offset = log.tell()
            popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        return cls(name, popen, log_path, log_offset)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def last_line(self, max_chars: int = 300) -> str:
        """The last non-empty line this run wrote to its log, shortened: most often the
        process's own word on why it ended, said where its exit is reported."""
        try:
            with open(self.log_path, "rb") as log:
                end = log.seek(0, os.SEEK_END)
                log.seek(max(self.log_offset, end - 4096))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return ""
        return lines[-1] if len(lines[-1]) <= max_chars else lines[-1][:max_chars] + "..."

    def log_of_this_run(self) -> str:
        """The log from this run's start on (a restart appends: not an earlier run's lines)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, check: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> None:
        """Poll `check` until true; fail fast if the process exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running():
                raise ProcessFailed(
                    f"{self.name} exited with code {self.popen.returncode} before it was ready;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            if check():
                return
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"{self.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(poll_s)

    def terminate(self) -> None:
        """SIGTERM the process group and return (a drain: the process exits when done)."""
        if self.running():
            _signal_group(self.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout_s`."""
        family = descendants(self.pid)
        if self.running():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Stragglers of the group (children that ignored TERM) go too.
        _signal_group(self.pid, signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return self.popen.returncode


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)

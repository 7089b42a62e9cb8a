"""Per-process work counters for the scale-out sweep: what a frontend process did per request,
in units that do not depend on how fast its CPU ran.

A saturated frontend's CPU per request rose with the number of frontend processes (the sweep's
rows in benchmarks/README.md). Two kinds of cause look alike in CPU seconds: the process doing
more work per request (more messages to read, more wake-ups) or the same work running slower
(CPUs, caches and memory shared with more busy processes). These counters tell them apart:

- `/proc/<pid>/io`: read and write system calls and bytes (every socket read of uvloop's
  event loop is a read(2): the NATS messages and HTTP requests it takes in);
- `/proc/<pid>/stat`: CPU time in user space and in the kernel (the loopback network's and
  epoll's work is the kernel's);
- `/proc/<pid>/task/*/status`: voluntary and involuntary context switches (a voluntary one
  is the event loop going to sleep in epoll with nothing to do);
- `perf_event_open(2)` (where the kernel and the hypervisor let us): instructions and
  cycles retired in user space by every thread of the process; instructions per request
  flat while cycles per request rise means the same work ran slower.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path

_PERF_TYPE_HARDWARE = 0
_PERF_COUNT_HW_CPU_CYCLES = 0
_PERF_COUNT_HW_INSTRUCTIONS = 1
_ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER7 and later accept any size up to the kernel's own
_EXCLUDE_KERNEL = 1 << 5
_EXCLUDE_HV = 1 << 6
_SYSCALL_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}


@dataclass(frozen=True)
class Work:
    """A process's counters at one moment (differences of two are a run's work)."""

    read_calls: int = 0
    write_calls: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    voluntary_switches: int = 0
    involuntary_switches: int = 0
    user_ticks: int = 0  # CPU time in user space and in the kernel (clock ticks)
    system_ticks: int = 0
    instructions: int = 0  # 0: perf counters unavailable
    cycles: int = 0

    def __sub__(self, other: Work) -> Work:
        return Work(*(a - b for a, b in zip(self._values(), other._values(), strict=True)))

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def _values(self) -> tuple[int, ...]:
        return (self.read_calls, self.write_calls, self.read_bytes, self.write_bytes,
                self.voluntary_switches, self.involuntary_switches, self.user_ticks,
                self.system_ticks, self.instructions, self.cycles)  # fmt: skip


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _proc_work(pid: int) -> Work:
    """The /proc counters of `pid` (all its threads); zeros for a process gone."""
    io: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            io[key] = int(value)
    except (OSError, ValueError):
        pass
    voluntary = involuntary = 0
    for tid in _threads(pid):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    user = system = 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user, system = int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        pass
    return Work(io.get("syscr", 0), io.get("syscw", 0), io.get("rchar", 0), io.get("wchar", 0),
                voluntary, involuntary, user, system)  # fmt: skip


class _PerfCounter:
    """One hardware counter of one thread (user space only: what a paranoid level of 2, the
    usual default, lets a user count of their own processes)."""

    def __init__(self, tid: int, config: int) -> None:
        number = _SYSCALL_PERF_EVENT_OPEN.get(os.uname().machine)
        if number is None:
            raise OSError("perf_event_open: unknown syscall number on this machine")
        attr = bytearray(_ATTR_SIZE)
        struct.pack_into("IIQQQQQ", attr, 0, _PERF_TYPE_HARDWARE, _ATTR_SIZE, config, 0, 0, 0,
                         _EXCLUDE_KERNEL | _EXCLUDE_HV)  # fmt: skip
        libc = ctypes.CDLL(None, use_errno=True)
        buffer = ctypes.create_string_buffer(bytes(attr), _ATTR_SIZE)
        fd = libc.syscall(number, buffer, tid, -1, -1, 0)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"perf_event_open: {os.strerror(errno)}")
        self.fd = fd

    def read(self) -> int:
        try:
            return struct.unpack("Q", os.read(self.fd, 8))[0]
        except OSError:
            return 0

    def close(self) -> None:
        os.close(self.fd)


class ProcessWork:
    """Counts the work of a set of processes from now on (`take` returns each one's counters
    so far); hardware counters where `perf_event_open` works, the /proc ones always.
    Threads started after this object are not in the hardware counts (the frontend starts
    its threads before it listens)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self.perf_error: str | None = None
        self._counters: dict[int, list[tuple[_PerfCounter, _PerfCounter]]] = {}
        for pid in self.pids:
            pairs = []
            for tid in _threads(pid):
                try:
                    pairs.append((_PerfCounter(tid, _PERF_COUNT_HW_INSTRUCTIONS),
                                  _PerfCounter(tid, _PERF_COUNT_HW_CPU_CYCLES)))  # fmt: skip
                except OSError as exc:
                    self.perf_error = str(exc)
                    break
            if self.perf_error is not None:
                break
            self._counters[pid] = pairs
        if self.perf_error is not None:
            self.close()

    def take(self) -> list[Work]:
        """Each process's counters (in `pids` order) since this object counted it."""
        works = []
        for pid in self.pids:
            work = _proc_work(pid)
            pairs = self._counters.get(pid, [])
            instructions = sum(i.read() for i, _ in pairs)
            cycles = sum(c.read() for _, c in pairs)
            works.append(work + Work(instructions=instructions, cycles=cycles))
        return works

    def close(self) -> None:
        for pairs in self._counters.values():
            for instructions, cycles in pairs:
                instructions.close()
                cycles.close()
        self._counters = {}

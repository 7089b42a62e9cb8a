"""Each test's time against a committed baseline (tests/durations_baseline.txt): CI time made
visible. A run ends with a short section naming the tests that took more than
`SLOWER_FACTOR` times their baseline, and the run's time against the baseline's for the same
tests. It never fails a run: on a loaded 2-core machine timings move by tens of percent.
`pytest --write-durations-baseline` (`make durations-baseline`: the whole suite) folds the
run's times into the file instead. A test's time is its setup, call and teardown together,
so a module-scoped deployment's start-up counts in the module's first test.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

BASELINE = Path(__file__).with_name("durations_baseline.txt")
SLOWER_FACTOR = 2.0
MIN_EXTRA_S = 0.5  # a 0.01 s test taking 0.03 s is noise, not a slower test


def read_baseline(path: Path) -> dict[str, float]:
    """`{node id: seconds}` of a baseline file (lines `SECONDS NODEID`; none if no file)."""
    if not path.exists():
        return {}
    durations: dict[str, float] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            seconds, node_id = line.split(" ", 1)
            durations[node_id] = float(seconds)
    return durations


def format_baseline(durations: dict[str, float]) -> str:
    """The file's text: one `SECONDS NODEID` line per test, by node id (small diffs)."""
    header = "# seconds per test (setup + call + teardown); pytest --write-durations-baseline\n"
    return header + "".join(f"{durations[n]:.3f} {n}\n" for n in sorted(durations))


def slower_than_baseline(
    now: dict[str, float],
    baseline: dict[str, float],
    factor: float = SLOWER_FACTOR,
    min_extra_s: float = MIN_EXTRA_S,
) -> list[tuple[str, float, float]]:
    """(node id, baseline s, now s) of the tests more than `factor` times their baseline
    and at least `min_extra_s` slower, the largest extra time first."""
    slower = [
        (node_id, baseline[node_id], seconds)
        for node_id, seconds in now.items()
        if node_id in baseline
        and seconds > factor * baseline[node_id]
        and seconds - baseline[node_id] >= min_extra_s
    ]
    return sorted(slower, key=lambda row: row[2] - row[1], reverse=True)


def run_against_baseline(now: dict[str, float], baseline: dict[str, float], name: str) -> str:
    """One line: this run's time for the tests the baseline has, against the baseline's."""
    known = [n for n in now if n in baseline]
    ran, was = sum(now[n] for n in known), sum(baseline[n] for n in known)
    ratio = f" (x{ran / was:.2f} the baseline)" if was > 0 else ""
    return (
        f"this run: {ran:.1f} s for the {len(known)} tests in {name}, which has {was:.1f} s "
        f"for them{ratio}; {len(now) - len(known)} tests not in it"
    )


class DurationsPlugin:
    """Sums each test's phases as they report; compares or writes at the end of the run."""

    def __init__(self, path: Path, root: Path, write: bool) -> None:
        self.path, self.root, self.write = path, root, write
        self.durations: dict[str, float] = defaultdict(float)
        self.not_passed: set[str] = set()  # skipped or failed: their times say nothing

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.durations[report.nodeid] += report.duration
        if not report.passed:
            self.not_passed.add(report.nodeid)

    def passed(self) -> dict[str, float]:
        return {n: s for n, s in self.durations.items() if n not in self.not_passed}

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        now, baseline = self.passed(), read_baseline(self.path)
        if not now:
            return
        if self.write:
            merged = {**baseline, **now}
            # Tests whose file is gone go too (a test renamed in a kept file stays: harmless).
            kept = {n: s for n, s in merged.items() if (self.root / n.split("::")[0]).exists()}
            self.path.write_text(format_baseline(kept))
            terminalreporter.write_line(f"durations of {len(now)} tests written to {self.path}")
            return
        terminalreporter.section("durations against the baseline")
        terminalreporter.write_line(run_against_baseline(now, baseline, self.path.name))
        slower = slower_than_baseline(now, baseline)
        for node_id, before, seconds in slower:
            terminalreporter.write_line(f"  {seconds:8.2f} s, was {before:.2f} s: {node_id}")
        if slower:
            terminalreporter.write_line(
                f"{len(slower)} tests took more than {SLOWER_FACTOR:g}x their baseline"
            )

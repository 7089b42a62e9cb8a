"""The suite's own bookkeeping: `slow` is the union of the markers that say what a test needs
(so `make test-fast`, `-m 'not slow'`, leaves all of them out), files are marked by what
their names say, and the durations baseline reads, writes and compares as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from durations_baseline import (
    format_baseline,
    read_baseline,
    run_against_baseline,
    slower_than_baseline,
)
from suite_markers import SLOW_KINDS


def test_every_kind_that_needs_something_is_slow(request: pytest.FixtureRequest) -> None:
    """Over this session's items: under `-m 'not slow'` none of them may carry a slow kind
    (the union failed to apply before deselection), in a full run each such one is slow."""
    for item in request.session.items:
        kinds = [kind for kind in SLOW_KINDS if item.get_closest_marker(kind)]
        if kinds:
            assert item.get_closest_marker("slow"), f"{item.nodeid}: {kinds} but not slow"


def test_file_names_agree_with_markers(request: pytest.FixtureRequest) -> None:
    for item in request.session.items:
        name = item.path.name
        if name.endswith("_e2e.py"):
            assert item.get_closest_marker("e2e"), item.nodeid
        if name.endswith("_integration.py"):
            assert item.get_closest_marker("integration"), item.nodeid


def test_users_of_real_services_are_marked(etcd_endpoint: str, request: pytest.FixtureRequest):
    assert request.node.get_closest_marker("services")
    assert not request.node.get_closest_marker("slow")


def test_baseline_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "baseline.txt"
    durations = {"tests/b.py::test_x[1 2]": 1.25, "tests/a.py::test_y": 0.0004}
    path.write_text(format_baseline(durations))
    assert read_baseline(path) == {"tests/b.py::test_x[1 2]": 1.25, "tests/a.py::test_y": 0.0}
    assert read_baseline(tmp_path / "none.txt") == {}


def test_slower_names_only_doubled_tests_past_the_noise_floor() -> None:
    baseline = {"doubled": 2.0, "noise": 0.01, "faster": 5.0, "same": 3.0, "most": 1.0}
    now = {"doubled": 4.5, "noise": 0.05, "faster": 1.0, "same": 5.9, "most": 9.0, "new": 7.0}
    assert slower_than_baseline(now, baseline) == [("most", 1.0, 9.0), ("doubled", 2.0, 4.5)]


def test_the_run_line_puts_this_run_against_the_baseline() -> None:
    line = run_against_baseline({"a": 3.0, "b": 1.0, "new": 5.0}, {"a": 1.0, "b": 1.0}, "f.txt")
    assert line == "this run: 4.0 s for the 2 tests in f.txt, which has 2.0 s for them " \
        "(x2.00 the baseline); 1 tests not in it"


def test_test_modules_have_names_of_their_own() -> None:
    """pytest imports test modules by their base name (the folders are no packages): two
    `test_x.py` anywhere stop the whole suite at collection, though each runs alone."""
    tests = Path(__file__).parent
    names = [path.name for path in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []

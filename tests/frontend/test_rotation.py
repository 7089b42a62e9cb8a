"""One round-robin rotation over the frontend processes of a deployment (`frontend.rotation`):
routers mapping the same counter file take turns, in one process, across two processes and
through two real frontends; a restarted one goes on; a missing file or env behaves."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from worker_cards import worker_card

from contract.discovery import WorkerCard
from contract.plan import FRONTEND_PROCESS_ENV, ROTATION_FILE_ENV
from frontend.rotation import SharedRotation, process_rotation
from frontend.router import RoundRobinRouter

REPO = Path(__file__).resolve().parents[2]


def card(worker_id: str) -> WorkerCard:
    return worker_card(worker_id)


CARDS = [card(name) for name in ("c", "a", "b")]


def test_two_routers_on_one_counter_take_turns(tmp_path: Path) -> None:
    path = str(tmp_path / "rotation")
    first, second = SharedRotation(path), SharedRotation(path)
    routers = [RoundRobinRouter(first), RoundRobinRouter(second)]
    chosen = [routers[i % 2].choose(CARDS, None).worker_id for i in range(6)]
    assert chosen == ["a", "b", "c", "a", "b", "c"]  # one rotation, whoever chooses
    # each on its own, the same sequence would be a, a, b, b, c, c
    own = [RoundRobinRouter(), RoundRobinRouter()]
    assert [own[i % 2].choose(CARDS, None).worker_id for i in range(6)][:2] == ["a", "a"]
    first.close()
    second.close()


def test_candidates_in_another_order_or_fewer(tmp_path: Path) -> None:
    """Each process sorts its candidates by worker id, so the same ticket is the same worker
    whatever order its directory lists them in; a process with fewer candidates (one it
    excludes) takes the ticket modulo its own list."""
    path = str(tmp_path / "rotation")
    one, other = RoundRobinRouter(SharedRotation(path)), RoundRobinRouter(SharedRotation(path))
    assert one.choose(CARDS, None).worker_id == "a"  # ticket 0
    assert other.choose(list(reversed(CARDS)), None).worker_id == "b"  # ticket 1
    assert other.choose([card("c"), card("b")], None).worker_id == "b"  # ticket 2: 2 % 2
    assert one.choose(CARDS, None).worker_id == "a"  # ticket 3


def test_a_restarted_process_goes_on_from_the_shared_count(tmp_path: Path) -> None:
    path = str(tmp_path / "rotation")
    before = SharedRotation(path)
    assert [next(before) for _ in range(5)] == [0, 1, 2, 3, 4]
    before.close()  # the process exits; the file stays
    again = SharedRotation(path)
    assert next(again) == 5
    assert Path(path).stat().st_size == 8
    again.close()


def test_two_os_processes_alternate_exactly(tmp_path: Path) -> None:
    """A second Python process maps the same file; the two draw in turn (each waits for the
    other's answer), and the workers chosen alternate as one rotation's."""
    path = str(tmp_path / "rotation")
    child_code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from contract.discovery import WorkerCard
        from frontend.rotation import SharedRotation
        from frontend.router import RoundRobinRouter
        cards = [WorkerCard(worker_id=n, role="agg", model="m", block_size=16, subject=n,
                            abort_subject=n, capacity=4, max_model_len=64) for n in "ba"]
        router = RoundRobinRouter(SharedRotation({path!r}))
        print("ready", flush=True)
        for line in sys.stdin:
            print(router.choose(cards, None).worker_id, flush=True)
    """)
    with subprocess.Popen([sys.executable, "-c", child_code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:  # fmt: skip
        try:
            assert child.stdin is not None and child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            rotation = SharedRotation(path)
            router = RoundRobinRouter(rotation)
            cards = [card("a"), card("b")]
            chosen = []
            for _ in range(5):
                chosen.append(router.choose(cards, None).worker_id)
                child.stdin.write("next\n")
                child.stdin.flush()
                chosen.append(child.stdout.readline().strip())
            assert chosen == ["a", "b"] * 5
            rotation.close()
        finally:
            child.kill()


def test_one_process_keeps_its_own_count_and_makes_no_file(tmp_path: Path) -> None:
    path = tmp_path / "rotation"
    rotation = process_rotation(1, {ROTATION_FILE_ENV: str(path)})
    assert isinstance(rotation, itertools.count)
    assert not path.exists()


def test_several_processes_create_the_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "rotation"
    rotation = process_rotation(2, {ROTATION_FILE_ENV: str(path)})
    assert isinstance(rotation, SharedRotation)
    assert path.stat().st_size == 8 and next(rotation) == 0
    rotation.close()


@pytest.mark.parametrize("where", ["unset", "no such folder"])
def test_without_a_usable_file_a_process_rotates_on_its_own_and_says_so(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {} if where == "unset" else {ROTATION_FILE_ENV: str(tmp_path / "gone" / "r")}
    with caplog.at_level(logging.WARNING, logger="frontend.rotation"):
        rotation = process_rotation(3, environ)
    assert isinstance(rotation, itertools.count)
    assert ROTATION_FILE_ENV in caplog.text


async def test_two_frontends_on_one_counter_alternate_their_workers(
    make_frontend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real frontends (processes 0 and 1 of 2, as the plan starts them) over the same
    counter file, each with workers w0 and w1 (two deployments here, so each request's
    worker is known by who received it): requests sent to them in turn go w0, w1, w0, ...
    in the order sent, not each frontend's own w0 first."""
    monkeypatch.setenv(ROTATION_FILE_ENV, str(tmp_path / "rotation"))
    frontends = []
    for index in range(2):
        monkeypatch.setenv(FRONTEND_PROCESS_ENV, f"{index}/2")
        harness = await make_frontend(router="round_robin")
        for worker_id in ("w1", "w0"):
            await harness.add_worker(worker_id)
        frontends.append(harness)
    chosen = []
    for i in range(6):
        harness = frontends[i % 2]
        async with harness.client() as client:
            response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert response.status_code == 200, response.text
        served = [w for w in harness.workers if len(w.requests) > sum(c[0] == w for c in chosen)]
        assert len(served) == 1
        chosen.append((served[0], served[0].worker_id))
    assert [worker_id for _, worker_id in chosen] == ["w0", "w1"] * 3


def _draw_flat_out(path: str, count: int, start: float, out: multiprocessing.Queue) -> None:
    rotation = SharedRotation(path)
    while time.time() < start:
        pass
    out.put([next(rotation) for _ in range(count)])


def test_processes_drawing_at_once_never_share_a_ticket(tmp_path: Path) -> None:
    """Four processes drawing back to back from the same instant: every ticket once (the
    lock; without it, on the device, 7 such processes repeated half their tickets)."""
    path = str(tmp_path / "rotation")
    SharedRotation(path).close()
    out: multiprocessing.Queue = multiprocessing.Queue()
    start = time.time() + 0.3
    drawers = [multiprocessing.Process(target=_draw_flat_out, args=(path, 20000, start, out))
               for _ in range(4)]  # fmt: skip
    for drawer in drawers:
        drawer.start()
    tickets = sorted(t for _ in drawers for t in out.get(timeout=60))
    for drawer in drawers:
        drawer.join(timeout=10)
    assert tickets == list(range(80000))

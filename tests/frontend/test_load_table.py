"""The frontend processes' shared in-flight counts (`frontend.load_table`): trackers on one
file see each other's counts at once; a restarted index, a dead process and a clean stop
leave no count behind; the name table's bounds; the NATS fallback; two real frontends."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from worker_cards import worker_card

from contract.config import KvRouterConfig
from contract.discovery import WorkerCard
from contract.messages import GenerateRequest
from contract.plan import FRONTEND_PROCESS_ENV, LOAD_TABLE_ENV
from frontend import load_table
from frontend.kv_index import KvIndex
from frontend.kv_router import KvRouter
from frontend.load_share import LoadShare
from frontend.load_table import (
    COLUMNS,
    LoadTable,
    SharedTurns,
    TableFull,
    TableLoadShare,
    process_load_share,
)
from frontend.router import LeastLoadedRouter, LoadTracker

REPO = Path(__file__).resolve().parents[2]


def card(worker_id: str) -> WorkerCard:
    return worker_card(worker_id)


def shared(path: Path, index: int, count: int, blocks: dict[str, int] | None = None):  # type: ignore[no-untyped-def]
    """A tracker of process `index` of `count` sharing through the table at `path`."""
    tracker = LoadTracker()
    blocks_of = (lambda worker_id: blocks.get(worker_id, 0)) if blocks else None
    share = TableLoadShare(LoadTable(str(path), index, count), tracker, blocks_of)
    share.attach()
    return tracker, share


def test_two_trackers_on_one_file_see_each_others_counts_at_once(tmp_path: Path) -> None:
    path = tmp_path / "load"
    blocks = [{"w0": 12}, {"w1": 3}]
    (first, _), (second, _) = (shared(path, i, 3, blocks[i]) for i in range(2))
    first.started("w0")
    first.started("w0")
    second.started("w1")
    # no message, no wait: the next read sees it
    assert second.peer_requests == {"w0": 2} and first.peer_requests == {"w1": 1}
    assert second.peer_blocks == {"w0": 12} and first.peer_blocks == {"w1": 3}
    assert second.requests_on("w0") == 2 and first.requests_on("w1") == 1
    cards = [card("w0"), card("w1"), card("w2")]
    assert LeastLoadedRouter(second).choose(cards, None).worker_id == "w2"
    first.finished("w0")
    assert second.peer_requests.get("w0", 0) == 1
    first.finished("w0")
    assert second.peer_requests == {} and second.peer_requests.get("w0", 0) == 0
    assert second.peer_requests.get("never-named", 0) == 0


def test_counts_before_the_table_was_attached_are_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "load"
    tracker = LoadTracker()
    tracker.started("w3")
    TableLoadShare(LoadTable(str(path), 0, 2), tracker).attach()
    other, _ = shared(path, 1, 2)
    assert other.peer_requests == {"w3": 1}


def test_a_restarted_index_clears_its_row(tmp_path: Path) -> None:
    path = tmp_path / "load"
    crashed, _ = shared(path, 0, 2)
    other, _ = shared(path, 1, 2)
    crashed.started("w0")
    crashed.started("w1")
    assert other.peer_requests == {"w0": 1, "w1": 1}
    # process 0 died without a word (its requests with it); the supervisor starts index 0 again
    restarted, _ = shared(path, 0, 2)
    assert other.peer_requests == {}
    restarted.started("w1")
    assert other.peer_requests == {"w1": 1}


def test_a_clean_stop_clears_the_row_and_its_pid(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "load"
    stopping, share = shared(path, 0, 2)
    other, _ = shared(path, 1, 2)
    stopping.started("w0")
    asyncio.run(share.stop())
    assert other.peer_requests == {}
    reader = LoadTable(str(path), 1, 2)
    assert reader.check_rows(alive=lambda pid: False) == []  # no pid left to check
    reader.close()


def test_the_row_of_a_dead_process_is_ignored(tmp_path: Path) -> None:
    """A real second process claims row 1 and routes two requests to w0, then is killed:
    its row counts while it lives and not once it is gone (until its index restarts)."""
    path = tmp_path / "load"
    tracker, share = shared(path, 0, 2)
    child_code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from frontend.load_table import LoadTable, TableLoadShare
        from frontend.router import LoadTracker
        tracker = LoadTracker()
        TableLoadShare(LoadTable({str(path)!r}, 1, 2), tracker).attach()
        tracker.started("w0")
        tracker.started("w0")
        print("routed", flush=True)
        sys.stdin.read()
    """)
    with subprocess.Popen([sys.executable, "-c", child_code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:  # fmt: skip
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "routed"
        share.table.check_rows()
        assert tracker.peer_requests == {"w0": 2}
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert share.table.check_rows() == [1]
    assert tracker.peer_requests == {} and tracker.requests_on("w0") == 0


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert not load_table.process_alive(child.pid)
        assert load_table.process_alive(os.getpid())
    finally:
        child.wait()


def test_more_workers_than_columns_is_a_clear_error_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "load"
    table = LoadTable(str(path), 0, 2)
    for column in range(COLUMNS):
        assert table.column_for(f"w{column}") == column
    with pytest.raises(TableFull, match=f"all {COLUMNS} worker columns"):
        table.column_for("one-more")
    with pytest.raises(TableFull, match="longer than"):
        LoadTable(str(path), 1, 2).column_for("x" * 200)
    # through the tracker: the request is still counted in its process, the error said once
    tracker = LoadTracker()
    TableLoadShare(table, tracker).attach()
    with caplog.at_level(logging.ERROR, logger="frontend.load_table"):
        tracker.started("one-more")
        tracker.started("one-more")
    assert tracker.requests_on("one-more") == 2
    assert caplog.text.count("one-more") == 1
    # another process reading the full table finds every name
    reader = LoadTable(str(path), 1, 2)
    assert reader.column_for(f"w{COLUMNS - 1}") == COLUMNS - 1
    assert len(reader.named_workers()) == COLUMNS


@pytest.mark.parametrize("rows", [(2, 2), (-1, 2), (0, 65)])
def test_rows_out_of_range_are_refused(tmp_path: Path, rows: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=LOAD_TABLE_ENV):
        LoadTable(str(tmp_path / "load"), *rows)


@pytest.mark.parametrize("where", ["unset", "no such folder", "not a table"])
def test_without_a_usable_table_a_process_shares_over_nats_and_says_so(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ("gone/load" if where == "no such folder" else "load")
    if where == "not a table":
        path.write_bytes(b"something else")
    environ = {} if where == "unset" else {LOAD_TABLE_ENV: str(path)}
    fallback = LoadShare("nats://127.0.0.1:1", "d", LoadTracker())
    with caplog.at_level(logging.WARNING, logger="frontend.load_table"):
        chosen = process_load_share(environ, 0, 2, LoadTracker(), None, lambda: fallback)
    assert chosen is fallback
    assert LOAD_TABLE_ENV in caplog.text and "NATS" in caplog.text


def test_a_table_of_another_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "load"
    LoadTable(str(path), 0, 2).close()
    with open(path, "r+b") as raw:
        raw.seek(4)
        raw.write((99).to_bytes(4, sys.byteorder))  # another version
    with pytest.raises(OSError, match="version"):
        LoadTable(str(path), 1, 2)


async def test_two_frontends_on_one_table_spread_held_requests(
    make_frontend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real frontends (processes 0 and 1 of 2) on one table, least_loaded, each with the
    same three workers (two deployments of FAKE workers, so each request's worker is known):
    three streams held open through them in turn land on three different workers. Each on
    its own view, the second would go to the first one's worker (w0 twice)."""
    monkeypatch.setenv(LOAD_TABLE_ENV, str(tmp_path / "load"))
    frontends = []
    for index in range(2):
        monkeypatch.setenv(FRONTEND_PROCESS_ENV, f"{index}/2")
        harness = await make_frontend(router="least_loaded")
        assert isinstance(harness.app.state.frontend.load_share, TableLoadShare)
        for worker_id in ("w2", "w1", "w0"):
            await harness.add_worker(worker_id, delay_s=0.2)
        frontends.append(harness)
    async with contextlib.AsyncExitStack() as stack:
        for i in range(3):
            client = await stack.enter_async_context(frontends[i % 2].client())
            response = await stack.enter_async_context(client.stream(
                "POST", "/v1/completions",
                json={"prompt": "hi", "max_tokens": 40, "stream": True},  # ~4 s of tokens
            ))  # fmt: skip
            assert response.status_code == 200
            lines = response.aiter_lines()
            stack.push_async_callback(lines.aclose)
            await anext(lines)  # routed and running
        per_worker: dict[str, int] = {}
        for worker in frontends[0].workers + frontends[1].workers:
            if worker.requests:
                per_worker[worker.worker_id] = per_worker.get(worker.worker_id, 0) + len(
                    worker.requests
                )
        assert per_worker == {"w0": 1, "w1": 1, "w2": 1}


def kv_process(path: Path, index: int, count: int, share_turns: bool):  # type: ignore[no-untyped-def]
    """A KV router of frontend process `index`, sharing counts (and turns, if asked) through
    the table at `path`, as `FrontendState` wires it."""
    tracker = LoadTracker()
    router = KvRouter(KvRouterConfig(), KvIndex(), tracker, seed=7)
    share = TableLoadShare(LoadTable(str(path), index, count), tracker, router.own_blocks)
    share.attach()
    if share_turns:
        router.share_turns(SharedTurns(share.table), SharedTurns.stamp)
    return router, tracker


@pytest.mark.parametrize("share_turns", [True, False])
def test_kv_routers_of_two_processes_take_turns_together(tmp_path: Path, share_turns) -> None:
    """A burst arriving in two processes onto idle workers, prompts sharing nothing: with the
    turns in the table each request goes to a worker none has routed to yet; with each
    process's own turns the second process repeats the first one's choices."""
    processes = [kv_process(tmp_path / "load", i, 2, share_turns) for i in range(2)]
    workers = [card(f"w{i}") for i in range(4)]
    chosen = []
    for number in range(4):
        router, tracker = processes[number % 2]
        prompt = list(range(10_000 * (number + 1), 10_000 * (number + 1) + 64))
        worker_id = router.choose(
            workers, GenerateRequest(request_id=f"r{number}", token_ids=prompt)
        ).worker_id
        tracker.started(worker_id)
        chosen.append(worker_id)
    if share_turns:
        assert sorted(chosen) == ["w0", "w1", "w2", "w3"]
    else:
        assert len(set(chosen)) < 4  # what the shared turns mend


def test_shared_turns_are_one_record_for_every_process(tmp_path: Path) -> None:
    first, second = (SharedTurns(LoadTable(str(tmp_path / "load"), i, 2)) for i in range(2))
    assert second.get("w0", -1) == -1  # nobody routed there yet
    first["w0"] = 5
    second["w1"] = 7
    assert (first.get("w0", -1), first.get("w1", -1)) == (5, 7)
    assert (second.get("w0", -1), second.get("w1", -1)) == (5, 7)
    assert SharedTurns.stamp() <= SharedTurns.stamp()


def prompt_hashes_of(tokens: list[int]) -> list[int]:
    from frontend.kv_router import prompt_hashes

    return prompt_hashes(tokens, 16)


def test_routed_prefixes_and_pending_prefill_are_the_other_rows(tmp_path: Path) -> None:
    """Row 0 routes a 40-block prompt to w1: row 1 finds how deep any prompt shares it there
    (at the sampled positions), row 0 itself does not count its own; counts per prompt."""
    path = str(tmp_path / "load")
    writer, reader = (LoadTable(path, i, 2) for i in range(2))
    for table in (writer, reader):
        table.claim()
    system = list(range(640))  # 40 blocks
    routed = prompt_hashes_of(system)
    assert reader.peer_prefix_depths(routed) == {}
    writer.add_prefix("w1", routed)
    writer.add_prefix("w1", routed)  # a second request with the same prompt
    writer.write_pending("w1", 40)
    assert reader.peer_prefix_depths(routed) == {"w1": 40}
    longer = prompt_hashes_of(system + list(range(5000, 5100)))
    assert reader.peer_prefix_depths(longer) == {"w1": 32}  # its positions: ..., 31, 47
    shares_20 = prompt_hashes_of(system[:320] + list(range(9000, 9320)))
    assert reader.peer_prefix_depths(shares_20) == {"w1": 16}  # positions 15 and 31 sampled
    assert reader.peer_prefix_depths(prompt_hashes_of(list(range(7000, 7640)))) == {}
    assert writer.peer_prefix_depths(routed) == {}  # its own row is not a peer's
    # what the caller knows already (its KV index) is not looked for again, nor reported
    assert reader.peer_prefix_depths(routed, known={"w1": 40}) == {}
    assert reader.peer_prefix_depths(routed, known={"w1": 20, "w9": 40}) == {"w1": 40}
    assert reader.peer_prefix_depths(longer, known={"w1": 32}) == {}
    assert reader.peer_prefix_depths(longer, known={"w1": 31}) == {"w1": 32}
    assert reader.peer_pending_since("w1")[0] == 40 and writer.peer_pending_since("w1")[0] == 0
    writer.remove_prefix("w1", routed)
    assert reader.peer_prefix_depths(routed) == {"w1": 40}  # the other request holds it
    writer.remove_prefix("w1", routed)
    assert reader.peer_prefix_depths(routed) == {}
    reader.mark_prefill_start("w1", 12.5)
    assert writer.peer_pending_since("w1")[1] == 12.5 and writer.peer_pending_since("w9")[1] == 0.0
    writer.write_pending("w1", 7)
    assert reader.peer_pending_since("w1") == (7, 12.5)
    assert reader.peer_pending_since("w9") == (0, 0.0)


def test_a_dead_or_restarted_process_leaves_no_prefix_or_pending(tmp_path: Path) -> None:
    path = str(tmp_path / "load")
    reader, crashed = LoadTable(path, 0, 2), LoadTable(path, 1, 2)
    reader.claim()
    crashed.claim(pid=424242)
    routed = prompt_hashes_of(list(range(320)))
    crashed.add_prefix("w0", routed)
    crashed.write_pending("w0", 20)
    assert reader.peer_prefix_depths(routed) == {"w0": 20}
    assert reader.peer_pending_since("w0")[0] == 20
    assert reader.check_rows(alive=lambda pid: pid != 424242) == [1]
    assert reader.peer_prefix_depths(routed) == {} and reader.peer_pending_since("w0")[0] == 0
    reader.check_rows(alive=lambda pid: True)  # its index restarts: the new process's row
    assert reader.peer_prefix_depths(routed) == {"w0": 20}
    LoadTable(path, 1, 2).claim()
    assert reader.peer_prefix_depths(routed) == {} and reader.peer_pending_since("w0")[0] == 0


def kv_sharing(path: Path, index: int, count: int, share_routing: bool):  # type: ignore[no-untyped-def]
    router, tracker = kv_process(path, index, count, share_turns=True)
    if share_routing:
        table = LoadTable(str(path), index, count)
        router.share_routing(load_table.SharedRouting(table))
    return router, tracker


@pytest.mark.parametrize("share_routing", [True, False])
def test_a_prompt_routed_by_another_process_draws_its_prefix(
    tmp_path: Path, share_routing: bool
) -> None:
    """Process 0 routes a long system prompt's first request; before any KV event, process 1
    gets the same system prompt with another question: with the routing shared it goes where
    the prefix is being computed (and sees that worker's pending prefill), without it to
    another worker, which computes the prefix again."""
    processes = [kv_sharing(tmp_path / "load", i, 2, share_routing) for i in range(2)]
    workers = [card(f"w{i}") for i in range(4)]
    system = list(range(3200))
    first, second = (router for router, _ in processes)
    picked = first.choose(workers, GenerateRequest(request_id="a", token_ids=[*system, 1, 2]))
    processes[0][1].started(picked.worker_id)
    again = second.choose(workers, GenerateRequest(request_id="b", token_ids=[*system, 3, 4]))
    if share_routing:
        assert again.worker_id == picked.worker_id
        assert second.pending_prefill(picked.worker_id) >= 200  # process 0's prompt, ahead
        processes[0][1].prefilled("a")
        assert second.pending_prefill(picked.worker_id) < 200  # only its own ~1 block left
    else:
        assert again.worker_id != picked.worker_id


async def test_two_kv_frontends_send_a_shared_prefix_to_one_worker(
    make_frontend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real frontends (processes 0 and 1 of 2) on one table, kv, each with the same three
    workers (FAKE workers publish no KV events): a long prompt held open through the first,
    then the same prompt with another ending through the second, which goes where the first
    one's prefix is. Without the shared routing the second process knows nothing of it, and
    the shared turns send it to a worker not routed to yet."""
    monkeypatch.setenv(LOAD_TABLE_ENV, str(tmp_path / "load"))
    frontends = []
    for index in range(2):
        monkeypatch.setenv(FRONTEND_PROCESS_ENV, f"{index}/2")
        harness = await make_frontend(router="kv")
        for worker_id in ("w2", "w1", "w0"):
            await harness.add_worker(worker_id, delay_s=0.2)
        frontends.append(harness)
    system = "You are a careful assistant who answers in plain words. " * 40
    async with contextlib.AsyncExitStack() as stack:
        for index, question in enumerate(("What is a cache?", "What is a prefix?")):
            client = await stack.enter_async_context(frontends[index].client())
            response = await stack.enter_async_context(client.stream(
                "POST", "/v1/completions",
                json={"prompt": system + question, "max_tokens": 40, "stream": True},
            ))  # fmt: skip
            assert response.status_code == 200
            lines = response.aiter_lines()
            stack.push_async_callback(lines.aclose)
            await anext(lines)  # routed and running
        served = [
            [worker.worker_id for worker in harness.workers if worker.requests]
            for harness in frontends
        ]
        assert len(served[0]) == 1 and served[1] == served[0]


def test_the_peers_blocks_are_the_largest_other_row_not_their_sum(tmp_path: Path) -> None:
    """Two other processes each routed one system prompt's requests to w0 (30 and 50 distinct
    blocks in each): the reader counts 50, the lower bound of their union, not 80 (the
    shared prompt twice); a dead row counts not at all."""
    path = str(tmp_path / "load")
    reader, first, second = (LoadTable(path, i, 3) for i in range(3))
    for table in (reader, first):
        table.claim()
    second.claim(pid=434343)
    first.write("w0", 2, 30)
    second.write("w0", 3, 50)
    assert reader.peer_blocks("w0") == 50 and reader.peer_requests("w0") == 5
    reader.write("w0", 1, 90)  # its own row is no peer's
    first.write_pending("w0", 4)
    second.write_pending("w0", 6)
    first.mark_prefill_start("w0", 2.5)
    assert reader.peer_loads("w0") == (10, 2.5, 50)  # the router's one read of all three
    reader.check_rows(alive=lambda pid: pid != 434343)
    assert reader.peer_blocks("w0") == 30 and reader.peer_blocks("w9") == 0
    assert reader.peer_loads("w0") == (4, 2.5, 30) and reader.peer_loads("w9") == (0, 0.0, 0)

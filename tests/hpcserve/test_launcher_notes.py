"""What `hpcserve up` tells the user about the deployment it is about to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.config import load_config
from hpcserve.launcher import per_process_rotation_note, prepare_deployment

MOCKER = Path(__file__).resolve().parents[2] / "configs" / "local-mocker-kv.yaml"


@pytest.mark.parametrize("router", ["round_robin", "random"])
def test_several_processes_routing_without_load_are_told_to_share_counts(router: str) -> None:
    config = load_config(overrides=[f"frontend.router={router}"], environ={})
    note = per_process_rotation_note(config, 7)
    assert note is not None
    assert note.startswith(f"7 frontend processes each route {router} on their own")
    assert "frontend.router kv" in note


@pytest.mark.parametrize(
    ("router", "frontends"),
    [("round_robin", 1), ("kv", 7), ("least_loaded", 4)],
)
def test_no_note_for_one_process_or_a_router_that_shares_counts(
    router: str, frontends: int
) -> None:
    config = load_config(overrides=[f"frontend.router={router}"], environ={})
    assert per_process_rotation_note(config, frontends) is None


@pytest.mark.parametrize(("router", "told"), [("round_robin", True), ("kv", False)])
def test_up_says_it_when_planning_several_frontend_processes(
    router: str, told: bool, tmp_path: Path
) -> None:
    sets = [f"run_dir={tmp_path / 'run'}", "frontend.port=0", "frontend.workers=2",
            f"frontend.router={router}"]  # fmt: skip
    said: list[str] = []
    prepare_deployment(load_config(MOCKER, sets, environ={}), said.append)
    notes = [line for line in said if "frontend processes each route" in line]
    assert len(notes) == (1 if told else 0), said

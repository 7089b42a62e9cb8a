"""What `hpcserve up` tells the user about the deployment it is about to start."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.config import load_config
from contract.plan import ROTATION_FILE_ENV, rotation_file
from hpcserve.launcher import prepare_deployment

MOCKER = Path(__file__).resolve().parents[2] / "configs" / "local-mocker-kv.yaml"


@pytest.mark.parametrize("router", ["round_robin", "random", "kv"])
def test_several_frontend_processes_need_no_note_about_their_router(
    router: str, tmp_path: Path
) -> None:
    """Round robin rotates once over all the frontend processes (their shared counter,
    `frontend.rotation`); random is as random in several processes as in one: neither is worse for
    several processes, so `up` says nothing about it (it used to say their choices collide)."""
    sets = [f"run_dir={tmp_path / 'run'}", "frontend.port=0", "frontend.workers=2",
            f"frontend.router={router}"]  # fmt: skip
    said: list[str] = []
    deployment = prepare_deployment(load_config(MOCKER, sets, environ={}), said.append)
    assert not [line for line in said if "collide" in line or "on their own" in line], said
    rotations = {p.env[ROTATION_FILE_ENV] for p in deployment.plan if p.role == "frontend"}
    assert rotations == {rotation_file("local-mocker-kv", str(tmp_path / "run"))}

"""replay_sweep: one line per configuration and a summary per policy against the first."""

from __future__ import annotations

import re
import sys

import pytest

from benchmarks import replay_sweep


def test_a_policy_against_itself_is_even_in_every_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round robin against round robin (the replay is deterministic): every configuration's
    ratio is 1 and the summary counts them; two seeds x two lanes = four configurations."""
    argv = [
        "replay_sweep.py", "--policies", "round_robin;round_robin:", "--seeds", "0,1",
        "--hops", "5", "--lanes", "3,4", "--requests", "8", "--prompt-tokens", "200",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    replay_sweep.main()
    out = capsys.readouterr().out
    assert len(re.findall(r"^seed \d hop 5 lanes [34]:", out, re.M)) == 4
    assert "round_robin: mean x1.000 p50 x1.000" in out
    summary = re.search(r"replay_sweep round_robin: mean_geo=(\S+) .* lost=(\d+)/(\d+)", out)
    assert summary is not None
    assert (float(summary[1]), summary[2], summary[3]) == (1.0, "0", "4")

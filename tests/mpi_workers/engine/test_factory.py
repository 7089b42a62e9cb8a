"""`torch_placement`: where a torch engine runs, and how many CPU threads it takes there."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from contract.config import load_config
from contract.plan import RANKS_HERE_ENV
from mpi_workers.engine.factory import torch_placement


@pytest.fixture
def threads_restored() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cpu_config(*overrides: str):
    return load_config(None, ["engine.device=cpu", *overrides], environ={})


@pytest.mark.usefixtures("threads_restored")
def test_a_cpu_rank_takes_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = os.cpu_count() or 1
    monkeypatch.setenv(RANKS_HERE_ENV, str(cpus))  # as many ranks here as CPUs: one each
    torch.set_num_threads(cpus + 1)
    device, _ = torch_placement(cpu_config())
    assert device == "cpu" and torch.get_num_threads() == 1


@pytest.mark.usefixtures("threads_restored")
def test_configured_threads_win_and_no_plan_leaves_torch_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(RANKS_HERE_ENV, "1")
    torch_placement(cpu_config("engine.torch_threads=3"))
    assert torch.get_num_threads() == 3
    monkeypatch.delenv(RANKS_HERE_ENV)
    torch.set_num_threads(2)
    torch_placement(cpu_config())
    assert torch.get_num_threads() == 2

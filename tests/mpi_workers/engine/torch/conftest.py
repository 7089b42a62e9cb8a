"""The real SmolLM2 engine shared by a test module (started once per module; a module with
other engine settings defines its own `engine`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from torch_engines import running_engine

from mpi_workers.engine.torch.engine import TorchEngine


@pytest.fixture(scope="module")
def engine(smol_dir: Path) -> Iterator[TorchEngine]:
    with running_engine(smol_dir, num_blocks=512, max_num_seqs=16) as e:
        yield e

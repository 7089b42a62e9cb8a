"""A real torch engine for the length of a test module: started once, always shut down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mpi_workers.engine.torch.engine import TorchEngine


@contextlib.contextmanager
def running_engine(model_dir: Path, **settings: Any) -> Iterator[TorchEngine]:
    """`TorchEngine(model_dir, **settings)`, started; shut down when the block ends."""
    engine = TorchEngine(model_dir, **settings)
    asyncio.run(engine.start())
    try:
        yield engine
    finally:
        asyncio.run(engine.shutdown())

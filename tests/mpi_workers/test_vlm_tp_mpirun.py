"""A vision-language model under tensor parallelism for real (`mpirun -n 2`, CPU, gloo):
image requests (one image, two images, the first again from the prefix cache), with image
rows across prefill chunks, give the same greedy tokens as the same engine at TP=1 (run in
the test process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcserve.launcher import mpi_launcher

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = str(HERE / "vlm_tp_script.py")


def run_script(model_dir: Path, max_tokens: int, ranks: int) -> tuple[object, dict | None]:
    argv = [*mpi_launcher(), "-n", str(ranks), sys.executable, "-m", "mpi_workers.rank_guard",
            SCRIPT, str(model_dir), str(max_tokens)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done, (json.loads(lines[-1]) if lines else None)


async def test_vlm_tp2_equals_tp1(tiny_vlm_dir: Path) -> None:
    from vlm_tp_script import build_engine, lead

    base = await lead(build_engine(tiny_vlm_dir), 8)  # TP=1, in this process
    assert base["errors"] == [None, None, None]
    assert base["tokens"][0] != base["tokens"][1]
    assert base["tokens"][2] == base["tokens"][0] and base["cached"][2] > 64
    done, tp2 = run_script(tiny_vlm_dir, 8, 2)
    assert tp2 is not None, done.stderr[-3000:]
    assert tp2["tp"] == 2
    assert tp2["tokens"] == base["tokens"]
    assert tp2["cached"] == base["cached"]

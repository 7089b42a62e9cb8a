"""How tests switch `import tensorrt_llm` to the TEST DOUBLE (tests/trtllm_double).

In-process: `activate()` puts DOUBLE_ROOT first on sys.path. Subprocesses (workers, mpirun,
srun): `double_environ()` returns an environment whose PYTHONPATH starts with DOUBLE_ROOT and
whose PATH starts with DOUBLE_ROOT/bin (the `trtllm-llmapi-launch` stand-in).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOUBLE_ROOT: Path = Path(__file__).resolve().parent
BIN_DIR: Path = DOUBLE_ROOT / "bin"


def _prepend(value: str | None, entry: str) -> str:
    parts = [p for p in (value or "").split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *parts])


def double_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: os.environ) with the double first on PYTHONPATH and PATH."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = _prepend(env.get("PYTHONPATH"), str(DOUBLE_ROOT))
    env["PATH"] = _prepend(env.get("PATH", os.defpath), str(BIN_DIR))
    return env


def activate() -> None:
    """Make `import tensorrt_llm` resolve to the double in this process (idempotent)."""
    root = str(DOUBLE_ROOT)
    sys.path[:] = [root, *(entry for entry in sys.path if entry != root)]
    loaded = sys.modules.get("tensorrt_llm")
    if loaded is not None and not getattr(loaded, "_IS_TEST_DOUBLE", False):
        raise RuntimeError(f"a non-double tensorrt_llm is already imported: {loaded!r}")

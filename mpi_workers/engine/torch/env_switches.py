"""Switches from the environment for the torch engine: debug and A/B toggles that sit outside
the config schema (`HPCSERVE_OVERLAP_SCHEDULING=0`, `HPCSERVE_ROW_LINEARS=0`, ...). Kept here,
free of pydantic, so the GPU benchmarks import the engine's layers on a bare torch install."""

from __future__ import annotations

import os


def env_flag(name: str, default: bool) -> bool:
    """Unset or empty means `default`; "0", "false", "no" mean off; anything else on."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no")

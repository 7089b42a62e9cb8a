"""TEST DOUBLE of `tensorrt_llm.executor.request` (only the request priority default)."""

from __future__ import annotations

# Request priority is a float in [0.0, 1.0]; the double accepts and ignores it.
DEFAULT_REQUEST_PRIORITY = 0.5

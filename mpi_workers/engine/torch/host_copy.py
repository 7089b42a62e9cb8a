"""Host-to-device copies of per-step data that do not wait for the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory and synchronises the
stream: the host would stall until the GPU has finished the step in flight, which is exactly
the time overlapped scheduling hides. Values go through pinned memory with a non-blocking
copy instead (PyTorch's caching host allocator keeps the pinned block alive until the copy
has run). On the CPU this is plain `torch.tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, enqueued on the current stream without a sync."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)

"""What prefill workers, decode workers and the frontend agree on for disaggregated serving.

Two strategies (the seed's): `decode_first` — the frontend sends a request to a decode worker,
which reserves KV blocks, asks a prefill worker (`RemotePrefillRequest` on its prefill
subject) to compute the prompt and push the KV into them, then decodes; `prefill_first` — the
frontend sends it to a prefill worker, which computes the first token, streams it, and hands
the request to a decode worker (`DecodeHandoff`), which reserves blocks and asks the prefill
worker to push the KV (`KvPushRequest`), then streams the rest to the same reply inbox.
KV tickets are opaque JSON made by `mpi_workers.kv_transfer` (backend, address, layout).

Engines that move their own KV (TensorRT-LLM's cache transceiver) use the same messages
without tickets or holds: the prefill side returns `disaggregated_params` (the engine's
opaque handle, JSON) and the decode side streams every token, the first one included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from contract.messages import PROTOCOL_VERSION, GenerateOutput, GenerateRequest

Strategy = Literal["decode_first", "prefill_first"]
STRATEGY_ENV = "DISAGGREGATION_STRATEGY"


def default_strategy(router: str) -> Strategy:
    """The seed's rule: decode_first, but prefill_first when the router is KV-aware."""
    return "prefill_first" if router == "kv" else "decode_first"


def serving_roles(strategy: str | None) -> tuple[str, ...]:
    """Roles the frontend sends requests to: agg workers always, plus the strategy's entry."""
    return ("agg", "prefill") if strategy == "prefill_first" else ("agg", "decode")


def strategy_from_env(environ: Mapping[str, str]) -> str | None:
    value = environ.get(STRATEGY_ENV, "").strip()
    return value or None


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RemotePrefillRequest(_Message):
    """Prefill `request`'s prompt; push the KV of blocks `skip_blocks..` to `ticket`."""

    version: int = PROTOCOL_VERSION
    request: GenerateRequest
    ticket: dict[str, Any] | None = None  # None: the engine moves the KV itself
    skip_blocks: int = 0
    decode_worker_id: str = ""


class PrefillResult(_Message):
    """The first token (in `first`) and the sampler's RNG state after drawing it; or an error."""

    version: int = PROTOCOL_VERSION
    request_id: str
    first: GenerateOutput | None = None
    generator_state: str | None = None  # base64 of torch.Generator.get_state()
    disaggregated_params: dict[str, Any] | None = None  # engine-moved KV: its handle
    error: str | None = None
    error_param: str | None = None


class DecodeHandoff(_Message):
    """A prefilled request for a decode worker; its KV is held on `prefill_worker_id`."""

    version: int = PROTOCOL_VERSION
    request: GenerateRequest
    first: GenerateOutput
    generator_state: str | None = None
    reply: str
    prefill_worker_id: str
    hold_id: str = ""  # our kv_transfer: the prefill worker's hold of the blocks
    disaggregated_params: dict[str, Any] | None = None  # engine-moved KV: its handle


class KvPushRequest(_Message):
    version: int = PROTOCOL_VERSION
    hold_id: str
    ticket: dict[str, Any]
    skip_blocks: int = 0


class KvPushResult(_Message):
    version: int = PROTOCOL_VERSION
    ok: bool
    error: str | None = None

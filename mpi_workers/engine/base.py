"""The one interface every engine implements (built-in torch, mocker, TensorRT-LLM adapter).

The worker process only talks to this: it hands over a `GenerateRequest`, streams the
`GenerateOutput` chunks back, aborts on client disconnect, and forwards KV events and load
metrics to NATS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable

from contract.messages import GenerateOutput, GenerateRequest, KvEvent, LoadMetrics

KvEventSink = Callable[[list[KvEvent]], None]


class Engine(ABC):
    """An LLM engine driven by asyncio callers; the heavy stepping happens off the event loop."""

    model_name: str
    block_size: int
    max_model_len: int
    vocab_size: int
    simulated: bool = False

    @abstractmethod
    async def start(self) -> None:
        """Begin stepping; called once from the running event loop."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop stepping; unfinished requests end with finish_reason "abort"."""

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream new tokens; the last chunk has finish_reason.

        Bad input raises ValueError naming the parameter before any work is scheduled.
        Closing the iterator early aborts the request.
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" and its blocks are freed."""

    @abstractmethod
    def load_metrics(self) -> LoadMetrics:
        """Current load, cheap enough to call every step."""

    @abstractmethod
    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        """Receive KV `stored`/`removed` events, batched per step, from the stepping thread."""

    @abstractmethod
    def cached_block_hashes(self) -> list[int]:
        """Snapshot of every block hash currently reusable (for router reconciliation)."""

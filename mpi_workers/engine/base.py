"""The one interface every engine implements (built-in torch, mocker, TensorRT-LLM adapter).

The worker process only talks to this: it hands over a `GenerateRequest`, streams the
`GenerateOutput` chunks back, aborts on client disconnect, and forwards KV events and load
metrics to NATS. What an engine cannot do it declares (`unsupported_params`); the worker puts
that in its card and the frontend refuses such requests with a 400 naming the parameter.

Disaggregated serving needs one of two more interfaces, depending on who moves the KV:
- `BlockKvHandoff`: our `kv_transfer` moves the engine's KV blocks (the torch engine);
- `NativeKvHandoff`: the engine moves its own KV and hands us an opaque blob to pass along
  (TensorRT-LLM's cache transceiver and `DisaggregatedParams`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contract.messages import GenerateOutput, GenerateRequest, KvEvent, LoadMetrics

if TYPE_CHECKING:
    import torch

    from mpi_workers.kv_transfer.layout import KvLayout

KvEventSink = Callable[[list[KvEvent]], None]
FatalHandler = Callable[[str], None]


class Engine(ABC):
    """An LLM engine driven by asyncio callers; the heavy stepping happens off the event loop."""

    kind: str = "custom"  # the `engine.kind` that builds it
    model_name: str
    block_size: int
    max_model_len: int
    vocab_size: int
    simulated: bool = False
    # Request fields (`SamplingParams` names) this engine cannot honour: a request that sets
    # one away from its default is refused at the frontend, naming the field.
    unsupported_params: frozenset[str] = frozenset()
    # The `MediaRef` kinds ("image", "embeds") this engine takes; the worker card lists them
    # and the frontend refuses images no worker can take.
    media_kinds: frozenset[str] = frozenset()
    # What it serves: "generate", and "embed" where it can answer a request's `pooling`
    # (the pooled final hidden states of the prompt); the worker card lists them and the
    # frontend refuses embeddings no worker can make.
    tasks: frozenset[str] = frozenset({"generate"})
    # Why the engine can serve no more (a tensor-parallel rank died); set before its requests
    # are failed, so the worker can tell those errors from a request's own. None: healthy.
    failed: str | None = None

    @abstractmethod
    async def start(self) -> None:
        """Begin stepping; called once from the running event loop."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop stepping; unfinished requests end with finish_reason "abort"."""

    @abstractmethod
    def validate(self, request: GenerateRequest) -> None:
        """Raise ValueError naming the first bad field of `request` (no work is done)."""

    def prepare_media(self, request: GenerateRequest, payloads: list[bytes]) -> Any:
        """This engine's inputs for `request.media`, from their fetched payloads (same
        order): decoded, preprocessed and checked. The worker calls it in a thread (off the
        event loop) and passes the result to `generate(request, media=...)`. ValueError
        naming the request field ("messages") for media it cannot use."""
        del payloads
        raise ValueError(f"messages: engine {self.kind} takes no images ({len(request.media)})")

    @abstractmethod
    def generate(
        self, request: GenerateRequest, media: Any = None
    ) -> AsyncIterator[GenerateOutput]:
        """Stream new tokens; the last chunk has finish_reason. `media`: what
        `prepare_media` made of `request.media` (None for a text request).

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
        """Receive KV `stored`/`removed` events (blocks hashed with `contract.block_hash`)."""

    @abstractmethod
    def cached_block_hashes(self) -> list[int]:
        """Snapshot of every block hash currently reusable (for router reconciliation)."""

    def set_fatal_handler(self, handler: FatalHandler | None) -> None:
        """`handler(reason)` is called (from any thread) when the engine can serve no more
        (a tensor-parallel rank died). Engines that cannot fail that way ignore it."""
        del handler


@dataclass
class HeldPrefill:
    """A prompt computed on a prefill worker whose KV blocks are held for a transfer.

    `handle` is the engine's own bookkeeping (opaque to the worker); `sampler_state` lets the
    decode side continue the request's random stream exactly where prefill left it."""

    request_id: str
    first: GenerateOutput
    sampler_state: str | None
    handle: Any


@dataclass
class KvReservation:
    """Blocks a decode worker holds for a prompt; the first `skip_blocks` it already had
    (prefix cache), the other `num_missing_blocks` come over the wire."""

    request_id: str
    skip_blocks: int
    num_missing_blocks: int
    handle: Any


class BlockKvHandoff(ABC):
    """Disaggregation where our `kv_transfer` moves KV blocks between engines (torch).

    The transfer buffer always holds every KV head of the model (`kv_layout`), whatever the
    TP degrees of the two groups, so prefill and decode TP may differ."""

    @abstractmethod
    def kv_layout(self) -> KvLayout:
        """This group's side of the transfer handshake."""

    @abstractmethod
    def new_staging(self, num_blocks: int) -> torch.Tensor:
        """An empty transfer buffer for `num_blocks` blocks."""

    # prefill side
    @abstractmethod
    async def prefill_and_hold(self, request: GenerateRequest, media: Any = None) -> HeldPrefill:
        """Compute the prompt and its first token; keep the blocks until exported or released.
        `first.finish_reason` is set when the request ends at its first token. `media`:
        `prepare_media`'s result for the request's images (the prefill side encodes them)."""

    @abstractmethod
    async def export_held(self, held: HeldPrefill, skip_blocks: int) -> torch.Tensor:
        """The held prompt blocks from `skip_blocks` on, packed; the hold is released."""

    @abstractmethod
    async def release_held(self, held: HeldPrefill) -> None:
        """Free a hold nobody will export (idempotent)."""

    # decode side
    @abstractmethod
    async def reserve(
        self, request: GenerateRequest, media: Any = None
    ) -> KvReservation | None:
        """Blocks for the whole prompt (reusing cached prefix blocks: image blocks hash their
        image); None if the pool is short right now. `media`: `prepare_media`'s result,
        kept for a recompute of the prompt should the decode be preempted."""

    @abstractmethod
    async def import_kv(self, reservation: KvReservation, staging: torch.Tensor) -> None:
        """Write received blocks into the reservation's missing blocks."""

    @abstractmethod
    async def release_reservation(self, reservation: KvReservation) -> None:
        """Free a reservation that will not be decoded (idempotent)."""

    @abstractmethod
    def decode_reserved(
        self, reservation: KvReservation, first: GenerateOutput, sampler_state: str | None,
        media: Any = None,
    ) -> AsyncIterator[GenerateOutput]:
        """Run the imported prompt from its first token (already sent to the client); stream
        every later chunk. Closing the stream early aborts it. `media`: `prepare_media`'s
        result, if not given to `reserve` (a preempted decode recomputes its prompt)."""


class NativeKvHandoff(ABC):
    """Disaggregation where the engine moves its own KV (TensorRT-LLM's cache transceiver):
    the prefill side returns an opaque JSON-able blob that the decode side needs."""

    @abstractmethod
    async def prefill_only(
        self, request: GenerateRequest, media: Any = None
    ) -> tuple[GenerateOutput, dict[str, Any]]:
        """Run the prompt's context phase; (a chunk with usage counts, the blob for decode).
        `media`: what `prepare_media` made of `request.media` (None for a text request).
        Raises ValueError naming a bad parameter, RuntimeError when the engine failed it."""

    @abstractmethod
    def generate_from_prefill(
        self, request: GenerateRequest, prefill: dict[str, Any]
    ) -> AsyncIterator[GenerateOutput]:
        """Decode after a remote context phase; the stream starts with the first token.
        Takes no media: the KV holds the images, and the blob what decode needs of them."""

"""A fake engine for worker tests: deterministic tokens, a configurable pace, no model.

Token i of a request is `(last prompt token + i + 1) % 1000`. It validates `max_tokens` the
way the real engine does (ValueError naming the parameter), records aborts, and reports one
KV `stored` event per finished request.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from contract.block_hash import block_hashes
from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    KvStored,
    LoadMetrics,
)
from mpi_workers.engine.base import Engine, KvEventSink


class FakeEngine(Engine):
    model_name = "fake-model"
    block_size = 4
    max_model_len = 256
    vocab_size = 1000

    def __init__(self, token_delay_s: float = 0.0) -> None:
        self.token_delay_s = token_delay_s
        self.started = False
        self.stopped = False
        self.aborted: list[str] = []
        self.requests: list[GenerateRequest] = []
        self.media: list[Any] = []  # what `generate` got as `media`, per request
        self._abort_events: dict[str, asyncio.Event] = {}
        self._sink: KvEventSink | None = None
        self._hashes: list[int] = []

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True
        for event in self._abort_events.values():
            event.set()

    def validate(self, request: GenerateRequest) -> None:
        if request.sampling.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {request.sampling.max_tokens}")
        if not request.token_ids:
            raise ValueError("token_ids: the prompt is empty")

    async def generate(
        self, request: GenerateRequest, media: Any = None
    ) -> AsyncIterator[GenerateOutput]:
        self.validate(request)
        self.requests.append(request)
        self.media.append(media)
        aborted = self._abort_events.setdefault(request.request_id, asyncio.Event())
        last = request.token_ids[-1]
        try:
            for i in range(request.sampling.max_tokens):
                deadline = time.monotonic() + self.token_delay_s
                while not aborted.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(min(0.01, self.token_delay_s))
                if aborted.is_set():
                    yield GenerateOutput(request_id=request.request_id, finish_reason="abort")
                    return
                done = i == request.sampling.max_tokens - 1
                yield GenerateOutput(
                    request_id=request.request_id,
                    token_ids=[(last + i + 1) % self.vocab_size],
                    finish_reason="length" if done else None,
                    num_prompt_tokens=len(request.token_ids),
                )
        finally:
            self._abort_events.pop(request.request_id, None)
        self._emit_stored(request.token_ids)

    def _emit_stored(self, token_ids: list[int]) -> None:
        hashes = block_hashes(token_ids, self.block_size)
        self._hashes.extend(hashes)
        if self._sink is not None and hashes:
            event = KvStored(parent_hash=None, block_hashes=list(hashes))
            sink = self._sink
            # Like the real engine: the sink is called from another thread.
            thread = threading.Thread(target=sink, args=([event],))
            thread.start()
            thread.join()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        event = self._abort_events.get(request_id)
        if event is not None:
            event.set()

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(
            active_sequences=len(self._abort_events), total_blocks=100, free_blocks=100
        )

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return list(self._hashes)


def make_fake_engine(config: Any, model_path: Path) -> FakeEngine:
    """Factory for `python -m mpi_workers --engine-factory fake_engine:make_fake_engine`."""
    return FakeEngine(token_delay_s=float(os.environ.get("FAKE_ENGINE_TOKEN_DELAY_S", "0")))

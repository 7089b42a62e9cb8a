"""`NativeDisaggWorker`: prefill/decode workers of an engine that moves its own KV.

TensorRT-LLM moves the KV between a context-only and a generation-only request with its cache
transceiver (UCX or NIXL, set in the engine YAML); we only carry its `disaggregated_params`.

decode role, `decode_first`: pick a prefill worker round robin and send it a
`RemotePrefillRequest` (no ticket); it runs the context phase and answers a `PrefillResult`
with the params; we generate from them and stream every token (the engine emits the first
one itself). A prefill worker that fails, leaves or times out is replaced once.

prefill role, `prefill_first`: run the context phase, hand the request and its params to a
decode worker (`DecodeHandoff`), which announces itself on the reply inbox and streams the
whole answer. Nothing is streamed by the prefill worker.

Images: only the prefill worker fetches and prepares them (`Worker.prepare_media`); the
decode side gets what it needs of them in the engine's blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.errors import NoRespondersError

from contract.bus import decode_subject
from contract.bus import prefill_subject as prefill_subject_of
from contract.disagg import DecodeHandoff, PrefillResult, RemotePrefillRequest
from contract.discovery import WorkerCard
from contract.messages import GenerateRequest
from mpi_workers.disagg.peers import PeerWorker, RemoteFailure, RequestRejected
from mpi_workers.engine.base import NativeKvHandoff
from mpi_workers.worker import error_param

logger = logging.getLogger(__name__)


class NativeDisaggWorker(PeerWorker):
    def __init__(self, engine: Any, **kwargs: Any) -> None:
        if not isinstance(engine, NativeKvHandoff):
            raise TypeError(f"{type(engine).__name__} does not move its own KV")
        super().__init__(engine, **kwargs)
        self.kv: NativeKvHandoff = engine

    def peer_subjects(self) -> dict[str, Any]:
        if self.role == "prefill":
            return {prefill_subject_of(self.deployment, self.worker_id): self._on_remote_prefill}
        return {decode_subject(self.deployment, self.worker_id): self._on_handoff}

    async def start(self) -> None:
        await super().start()
        logger.info("%s %s strategy, KV moved by the engine", self.tag, self.strategy)

    # ----- decode role -------------------------------------------------------------------

    async def _prefill_remotely_then_decode(
        self, prefill: WorkerCard, request: GenerateRequest, reply: str
    ) -> None:
        params = await self._remote_prefill(prefill, request)
        await self._decode(request, params, reply)

    async def _remote_prefill(
        self, prefill: WorkerCard, request: GenerateRequest
    ) -> dict[str, Any]:
        """The prefill worker's params for `request`, or RemoteFailure / RequestRejected."""
        assert self._nc is not None
        message = RemotePrefillRequest(request=request, decode_worker_id=self.worker_id)
        subject = prefill_subject_of(self.deployment, prefill.worker_id)
        timeout = self.disagg.transfer_timeout_s
        ask = asyncio.ensure_future(
            self._nc.request(subject, message.model_dump_json().encode(), timeout=timeout)
        )
        with self._watch_gone(prefill.worker_id) as gone:
            gone_task = asyncio.ensure_future(gone.wait())
            try:
                done, _ = await asyncio.wait(
                    {ask, gone_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if ask not in done:
                    why = "left mid-prefill" if gone_task in done else (
                        f"did not finish within {timeout:.0f} s"
                    )
                    raise RemoteFailure(f"prefill worker {prefill.worker_id} {why}")
                answer = ask.result()
            except (TimeoutError, NoRespondersError) as exc:
                raise RemoteFailure(
                    f"prefill worker {prefill.worker_id} is not answering ({exc!r})"
                ) from None
            finally:
                gone_task.cancel()
                ask.cancel()
        result = PrefillResult.model_validate_json(answer.data)
        if result.error is not None:
            if result.error_param:
                raise RequestRejected(result.error, result.error_param)
            raise RemoteFailure(f"prefill worker {prefill.worker_id}: {result.error}")
        if result.disaggregated_params is None:
            raise RemoteFailure(f"prefill worker {prefill.worker_id} sent no KV handle")
        return result.disaggregated_params

    async def _decode(self, request: GenerateRequest, params: dict[str, Any], reply: str) -> None:
        finished = False
        async for output in self.kv.generate_from_prefill(request, params):
            await self._publish(reply, output)
            finished = output.finish_reason is not None
        if not finished:
            await self._reply_error(reply, request.request_id, "decode stream ended early", None)

    def _check_handoff(self, handoff: DecodeHandoff) -> None:
        if handoff.disaggregated_params is None:
            raise ValueError("disaggregated_params: the hand-off carries no KV handle")

    async def _decode_handoff(self, handoff: DecodeHandoff) -> None:
        request = handoff.request
        assert handoff.disaggregated_params is not None
        try:
            await self._decode(request, handoff.disaggregated_params, handoff.reply)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.engine.abort(request.request_id)
            raise
        except ValueError as exc:
            await self._reply_error(handoff.reply, request.request_id, str(exc), error_param(exc))
        except Exception as exc:
            logger.warning("%s decode of %s failed: %s", self.tag, request.request_id, exc)
            await self._reply_error(
                handoff.reply, request.request_id, f"decode after prefill failed: {exc}", None
            )

    # ----- prefill role ------------------------------------------------------------------

    async def _prefill_for(self, message: RemotePrefillRequest) -> PrefillResult:
        media = await self.prepare_media(message.request)  # ValueError: the request is bad
        first, params = await self.kv.prefill_only(message.request, media)
        return PrefillResult(
            request_id=message.request.request_id, first=first, disaggregated_params=params
        )

    async def _serve_prefill_first(self, request: GenerateRequest, reply: str) -> None:
        try:
            media = await self.prepare_media(request)
        except ValueError as exc:
            await self._reply_error(reply, request.request_id, str(exc), error_param(exc))
            return
        first, params = await self.kv.prefill_only(request, media)
        handoff = DecodeHandoff(
            request=request, first=first, reply=reply, prefill_worker_id=self.worker_id,
            disaggregated_params=params,
        )  # fmt: skip
        why = await self._hand_off(handoff)
        if why is not None:
            await self._reply_error(
                reply, request.request_id, f"handoff to a decode worker failed: {why}", None
            )

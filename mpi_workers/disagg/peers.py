"""`PeerWorker`: what prefill and decode workers share, whoever moves the KV.

A worker of a disaggregated pair watches the other role's workers in etcd (round-robin pick,
"has it left?" waits), forwards aborts of requests it handed to a decoder, and runs a request
by its role: a decode worker serves `decode_first`, a prefill worker `prefill_first` (see
`contract.disagg`). Subclasses say how: `DisaggWorker` moves KV blocks with our
`kv_transfer`, `NativeDisaggWorker` passes along the engine's own transfer handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from contract.bus import decode_subject
from contract.config import DisaggregationConfig
from contract.disagg import (
    DecodeHandoff,
    KvPushResult,
    PrefillResult,
    RemotePrefillRequest,
)
from contract.discovery import WorkerCard, WorkerDirectory
from contract.messages import AbortRequest, GenerateOutput, GenerateRequest
from mpi_workers.worker import Worker, error_param

logger = logging.getLogger(__name__)


class RemoteFailure(RuntimeError):
    """A remote prefill or KV transfer failed in a way another prefill worker may not."""


class RequestRejected(ValueError):
    """The prefill worker rejected the request itself (bad parameter): do not retry."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class PeerWorker(Worker):
    def __init__(
        self, engine: Any, *, disaggregation: DisaggregationConfig, **kwargs: Any
    ) -> None:
        super().__init__(engine, **kwargs)
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"a disaggregated worker serves prefill/decode, not {self.role!r}")
        self.disagg = disaggregation
        self.strategy = disaggregation.strategy or "decode_first"
        self.directory = WorkerDirectory(self.etcd_endpoint, self.deployment)
        self._round_robin = itertools.count()
        self._handed_off: dict[str, WorkerCard] = {}
        self._gone_waiters: dict[str, set[asyncio.Event]] = {}
        self.tag = f"[{self.role} {self.worker_id}]"

    def peer_subjects(self) -> dict[str, Callable[[Any], Coroutine[Any, Any, None]]]:
        """Extra NATS subjects of this role and their callbacks."""
        return {}

    def is_peer(self, card: WorkerCard) -> bool:
        """Whether `card` (of the other role) can pair with us."""
        return True

    async def start(self) -> None:
        self.directory.add_listener(self._on_workers_changed)
        await self.directory.start()
        await super().start()
        assert self._nc is not None
        for subject, callback in self.peer_subjects().items():
            self._subscriptions.append(await self._nc.subscribe(subject, cb=callback))

    async def stop(self) -> None:
        await super().stop()
        await self.directory.stop()

    # ----- discovery ---------------------------------------------------------------------

    def _on_workers_changed(self, workers: dict[str, WorkerCard]) -> None:
        for worker_id, events in self._gone_waiters.items():
            if worker_id not in workers:
                for event in events:
                    event.set()

    def _pick(self, role: str, exclude: set[str]) -> WorkerCard | None:
        peers = sorted(
            (
                card
                for card in self.directory.workers.values()
                if card.role == role and card.worker_id not in exclude and self.is_peer(card)
                and not card.draining
            ),
            key=lambda card: card.worker_id,
        )
        return peers[next(self._round_robin) % len(peers)] if peers else None

    @contextlib.contextmanager
    def _watch_gone(self, worker_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._gone_waiters.setdefault(worker_id, set()).add(event)
        if worker_id not in self.directory.workers:
            event.set()
        try:
            yield event
        finally:
            waiters = self._gone_waiters.get(worker_id, set())
            waiters.discard(event)
            if not waiters:
                self._gone_waiters.pop(worker_id, None)

    # ----- request plane -----------------------------------------------------------------

    async def _serve(self, request: GenerateRequest, reply: str) -> None:
        try:
            self.engine.validate(request)
        except ValueError as exc:
            await self._reply_error(reply, request.request_id, str(exc), error_param(exc))
            return
        try:
            if self.role == "decode":
                await self._serve_decode_first(request, reply)
            else:
                await self._serve_prefill_first(request, reply)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.engine.abort(request.request_id)
            raise
        except Exception as exc:
            logger.exception("%s request %s failed", self.tag, request.request_id)
            await self._reply_error(reply, request.request_id, f"{exc}", None)

    async def _serve_decode_first(self, request: GenerateRequest, reply: str) -> None:
        """decode role: prefill on a prefill worker (a second one if the first fails), then
        decode here; with no prefill worker, serve locally when allowed, else fail clearly."""
        rid = request.request_id
        tried: set[str] = set()
        failures: list[str] = []
        while len(tried) < 2:
            prefill = self._pick("prefill", tried)
            if prefill is None:
                break
            tried.add(prefill.worker_id)
            try:
                await self._prefill_remotely_then_decode(prefill, request, reply)
            except RequestRejected as exc:
                await self._reply_error(reply, rid, str(exc), exc.param)
            except RemoteFailure as exc:
                logger.warning("%s remote prefill of %s failed: %s", self.tag, rid, exc)
                failures.append(str(exc))
                continue
            return
        if not tried:
            if self.disagg.fallback_local_prefill:
                logger.info("%s no prefill worker; serving %s locally", self.tag, rid)
                await super()._serve(request, reply)
                return
            message = (
                f"no prefill worker is registered for deployment {self.deployment!r}; "
                "the decode worker cannot serve the request"
            )
        else:
            message = (
                f"remote prefill failed on {', '.join(sorted(tried))}: {'; '.join(failures)}"
            )
        await self._reply_error(reply, rid, message, None)

    async def _prefill_remotely_then_decode(
        self, prefill: WorkerCard, request: GenerateRequest, reply: str
    ) -> None:
        """Have `prefill` compute the prompt, then decode and stream here. RemoteFailure:
        that prefill worker failed (another may not); RequestRejected: the request is bad."""
        raise NotImplementedError

    async def _serve_prefill_first(self, request: GenerateRequest, reply: str) -> None:
        raise NotImplementedError

    async def _on_abort(self, msg) -> None:
        with contextlib.suppress(Exception):
            request_id = AbortRequest.model_validate_json(msg.data).request_id
            decoder = self._handed_off.get(request_id)
            if decoder is not None and self._nc is not None:
                await self._nc.publish(decoder.abort_subject, msg.data)
            task = self._inflight.get(request_id)
            if task is not None and self.role == "decode":
                task.cancel()  # also stops a remote prefill or KV import in progress
        await super()._on_abort(msg)

    async def _publish(self, reply: str, output: GenerateOutput) -> None:
        assert self._nc is not None
        if output.finish_reason == "error" and self.engine.failed is not None:
            return  # the engine failed, not the request: the frontend migrates it
        await self._nc.publish(reply, output.model_dump_json().encode())

    def _spawn(self, coro: Any) -> None:
        """Run `coro` as a background task of this worker (cancelled at stop)."""
        task = asyncio.ensure_future(coro)
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    def _track(self, request_id: str, task: asyncio.Task[None]) -> None:
        """Count `task` as an in-flight request of ours (drained at stop, abortable)."""
        self._inflight[request_id] = task
        task.add_done_callback(lambda _t, rid=request_id: self._request_done(rid))
        self._note_load_change()

    async def _on_remote_prefill(self, msg) -> None:
        self._spawn(self._answer_remote_prefill(msg))

    async def _answer_remote_prefill(self, msg) -> None:
        """prefill role, decode_first: run `_prefill_for` and answer with its `PrefillResult`
        (a bad request: the error naming its parameter; any other failure: the error)."""
        assert self._nc is not None
        try:
            message = RemotePrefillRequest.model_validate_json(msg.data)
        except ValueError as exc:
            logger.error("%s malformed RemotePrefillRequest: %s", self.tag, exc)
            return
        rid = message.request.request_id
        try:
            self.engine.validate(message.request)
            result = await self._prefill_for(message)
        except ValueError as exc:
            result = PrefillResult(request_id=rid, error=str(exc), error_param=error_param(exc))
        except Exception as exc:
            logger.warning("%s prefill of %s failed: %s", self.tag, rid, exc)
            result = PrefillResult(request_id=rid, error=f"{exc}")
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, result.model_dump_json().encode())

    async def _prefill_for(self, message: RemotePrefillRequest) -> PrefillResult:
        """Compute the prompt of a decode worker's request and hand its KV over."""
        raise NotImplementedError

    async def _on_handoff(self, msg) -> None:
        """decode role, prefill_first: accept a prefilled request at once (or refuse it with
        the reason), then take its KV over and decode it in `_decode_handoff`."""
        try:
            handoff = DecodeHandoff.model_validate_json(msg.data)
            self.engine.validate(handoff.request)
            self._check_handoff(handoff)
        except ValueError as exc:
            await self._reply_handoff(msg, False, str(exc))
            return
        await self._announce(handoff)
        rid = handoff.request.request_id
        self._track(rid, asyncio.create_task(self._decode_handoff(handoff), name=rid))
        await self._reply_handoff(msg, True)

    def _check_handoff(self, handoff: DecodeHandoff) -> None:
        """Raise ValueError when `handoff` lacks what this worker's transfer needs."""

    async def _decode_handoff(self, handoff: DecodeHandoff) -> None:
        """Take the prefilled KV of an accepted hand-off over and stream its decode."""
        raise NotImplementedError

    async def _announce(self, handoff: DecodeHandoff) -> None:
        """Tell the frontend this worker now owns the stream (before any chunk of ours and
        before the prefill worker lets go), so that our leaving fails the request there."""
        assert self._nc is not None
        announce = GenerateOutput(request_id=handoff.request.request_id, worker_id=self.worker_id)
        await self._nc.publish(handoff.reply, announce.model_dump_json().encode())

    async def _reply_handoff(self, msg, ok: bool, error: str | None = None) -> None:
        if msg.reply and self._nc is not None:
            result = KvPushResult(ok=ok, error=error)
            await self._nc.publish(msg.reply, result.model_dump_json().encode())

    async def _hand_off(self, handoff: DecodeHandoff) -> str | None:
        """prefill_first: give `handoff` to a decode worker (a second one if the first
        refuses or fails); None when one took it, else why none did."""
        assert self._nc is not None
        rid = handoff.request.request_id
        tried: set[str] = set()
        failures: list[str] = []
        while len(tried) < 2:
            decoder = self._pick("decode", tried)
            if decoder is None:
                break
            tried.add(decoder.worker_id)
            try:
                answer = await self._nc.request(
                    decode_subject(self.deployment, decoder.worker_id),
                    handoff.model_dump_json().encode(), timeout=5.0,
                )  # fmt: skip
                result = KvPushResult.model_validate_json(answer.data)
            except Exception as exc:
                failures.append(f"{decoder.worker_id}: {exc!r}")
                continue
            if not result.ok:
                failures.append(f"{decoder.worker_id}: {result.error}")
                if result.error and result.error.split(":")[0] in GenerateRequest.model_fields:
                    break
                continue
            self._handed_off[rid] = decoder
            asyncio.get_running_loop().call_later(
                self.disagg.transfer_timeout_s * 10, self._handed_off.pop, rid, None
            )
            return None
        return "; ".join(failures) or "no decode worker is registered"

"""`DisaggWorker`: a prefill or decode worker whose KV blocks our `kv_transfer` moves.

decode role, `decode_first` (GenerateRequest from the frontend): reserve blocks (prefix hits
are kept and not transferred), pick a prefill worker round robin, send it a
`RemotePrefillRequest` with the KV ticket, wait for the KV and the first token, decode and
stream. A prefill worker that fails, leaves or times out is replaced once; then the request
fails with a clear error. Reserved blocks are freed on every failure path.

prefill role, `prefill_first` (GenerateRequest from the frontend): prefill, stream the first
token, hold the blocks, hand the request to a decode worker (`DecodeHandoff`); that decode
worker announces itself on the reply inbox (a chunk with `worker_id`: the frontend now
watches it and sends aborts to it), reserves blocks and asks for the KV (`KvPushRequest`),
then streams the rest to the same reply inbox. Held blocks are freed once packed for
sending, or after the transfer timeout if nobody asks. Aborts reaching the prefill worker
are forwarded to the decoder.

The engine does its part through `BlockKvHandoff` (hold, export, reserve, import, decode);
under tensor parallelism the transfer endpoint is the group leader's and the KV on the wire
holds every global KV head, so prefill and decode TP may differ.

Images: the prefill worker fetches and encodes them; the decode worker fetches and prepares
them too, while the prompt is computed remotely (its reservation hashes image blocks with
their image from `request.media` alone; a preempted decode recomputes its prompt from the
media), but only encodes them if it has to recompute.

Test hook: `HPCSERVE_FAULT_PREFILL_EXIT=<worker_id>` makes that prefill worker exit abruptly
after computing a prefill and before pushing its KV (a crash mid-transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Any

import torch
from nats.errors import NoRespondersError

from contract.bus import decode_subject, kv_push_subject, prefill_subject
from contract.disagg import (
    DecodeHandoff,
    KvPushRequest,
    KvPushResult,
    PrefillResult,
    RemotePrefillRequest,
)
from contract.discovery import KvTransferInfo, WorkerCard
from contract.messages import GenerateOutput, GenerateRequest
from mpi_workers.disagg.peers import PeerWorker, RemoteFailure, RequestRejected
from mpi_workers.engine.base import BlockKvHandoff, HeldPrefill, KvReservation
from mpi_workers.kv_transfer import KvTransport, make_transport
from mpi_workers.worker import error_param

logger = logging.getLogger(__name__)

FAULT_ENV = "HPCSERVE_FAULT_PREFILL_EXIT"
RESERVE_WAIT_S = 30.0  # how long a decode worker waits for free blocks before failing


def kv_host() -> str:
    """The address peers reach this worker's KV listener at: `HPCSERVE_KV_HOST`, the Slurm
    node's name resolved, else loopback."""
    if os.environ.get("HPCSERVE_KV_HOST"):
        return os.environ["HPCSERVE_KV_HOST"]
    node = os.environ.get("SLURMD_NODENAME")
    if node:
        with contextlib.suppress(OSError):
            return socket.gethostbyname(node)
    return "127.0.0.1"


class DisaggWorker(PeerWorker):
    def __init__(self, engine: Any, **kwargs: Any) -> None:
        if not isinstance(engine, BlockKvHandoff):
            raise TypeError(f"{type(engine).__name__} cannot hand its KV blocks to kv_transfer")
        super().__init__(engine, **kwargs)
        self.kv: BlockKvHandoff = engine
        self.transport: KvTransport | None = None
        self.layout = engine.kv_layout()
        self._holds: dict[str, tuple[HeldPrefill, asyncio.TimerHandle]] = {}

    @property
    def card(self) -> WorkerCard:
        card = super().card
        if self.transport is not None:
            card.kv_transfer = KvTransferInfo(
                backend=self.transport.backend, address=self.transport.address
            )
        return card

    def is_peer(self, card: WorkerCard) -> bool:
        return card.kv_transfer is not None

    def peer_subjects(self) -> dict[str, Any]:
        if self.role == "prefill":
            return {
                prefill_subject(self.deployment, self.worker_id): self._on_remote_prefill,
                kv_push_subject(self.deployment, self.worker_id): self._on_kv_push,
            }
        return {decode_subject(self.deployment, self.worker_id): self._on_handoff}

    async def start(self) -> None:
        self.transport = make_transport(self.disagg.kv_transfer, name=self.worker_id)
        await self.transport.start(kv_host())
        await super().start()
        logger.info(
            "%s %s strategy, KV over %s at %s", self.tag, self.strategy,
            self.transport.backend, self.transport.address,
        )  # fmt: skip

    async def stop(self) -> None:
        await super().stop()
        for held, timer in list(self._holds.values()):
            timer.cancel()
            await self.kv.release_held(held)  # the stepping thread has stopped: runs inline
        self._holds.clear()
        if self.transport is not None:
            await self.transport.close()

    # ----- decode role -------------------------------------------------------------------

    async def _prefill_remotely_then_decode(
        self, prefill: WorkerCard, request: GenerateRequest, reply: str
    ) -> None:
        media_task = self._prepare_beside(request)
        try:
            reservation, result = await self._remote_prefill(prefill, request)
        except BaseException:
            media_task.cancel()
            raise
        try:
            media = await media_task
        except BaseException as exc:
            await self.kv.release_reservation(reservation)
            if isinstance(exc, ValueError):
                raise RequestRejected(str(exc), error_param(exc)) from None
            raise
        assert result.first is not None
        await self._publish(reply, result.first)
        if result.first.finish_reason is not None:
            await self.kv.release_reservation(reservation)
            return
        await self._decode(reservation, result.first, result.generator_state, reply, media)

    def _prepare_beside(self, request: GenerateRequest) -> asyncio.Future[Any]:
        """The decode side's media (kept for a recompute of the prompt), fetched and
        prepared while the prefill worker computes the prompt; its blocks' hashes need only
        `request.media`."""
        task = asyncio.ensure_future(self.prepare_media(request))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # always retrieved
        return task

    async def _reserve(self, request: GenerateRequest, media: Any = None) -> KvReservation:
        deadline = asyncio.get_running_loop().time() + RESERVE_WAIT_S
        while True:
            reservation = await self.kv.reserve(request, media)
            if reservation is not None:
                return reservation
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("KV pool full: no blocks free for the prompt's transfer")
            await asyncio.sleep(0.05)

    async def _receive_kv(
        self, reservation: KvReservation, prefill: WorkerCard, send: Any
    ) -> Any:
        """Expect the missing blocks, run `send(ticket)` (a NATS request to the prefill
        worker), and wait for both the reply and the data; import into the reserved blocks."""
        assert self.transport is not None and self._nc is not None
        transfer_id = f"{reservation.request_id}-{uuid.uuid4().hex[:8]}"
        staging = self.kv.new_staging(reservation.num_missing_blocks)
        ticket = self.transport.expect(transfer_id, staging, self.layout)
        landed = self.transport.future(transfer_id)
        timeout = self.disagg.transfer_timeout_s
        reply_task = asyncio.ensure_future(send(ticket, timeout))
        try:
            with self._watch_gone(prefill.worker_id) as gone:
                gone_task = asyncio.ensure_future(gone.wait())
                try:
                    async with asyncio.timeout(timeout):
                        pending = {reply_task, asyncio.ensure_future(asyncio.shield(landed))}
                        while pending:
                            done, _ = await asyncio.wait(
                                pending | {gone_task}, return_when=asyncio.FIRST_COMPLETED
                            )
                            if gone_task in done:
                                raise RemoteFailure(
                                    f"prefill worker {prefill.worker_id} left mid-transfer"
                                )
                            for task in done:
                                pending.discard(task)
                                if task is reply_task:
                                    self._check_reply(task.result(), prefill)
                                else:
                                    task.result()
                except TimeoutError:
                    raise RemoteFailure(
                        f"prefill worker {prefill.worker_id} did not finish within {timeout:.0f} s"
                    ) from None
                except NoRespondersError as exc:
                    raise RemoteFailure(
                        f"prefill worker {prefill.worker_id} is not answering ({exc!r})"
                    ) from None
                finally:
                    gone_task.cancel()
        finally:
            reply_task.cancel()
            self.transport.cancel(transfer_id)
        await self.kv.import_kv(reservation, staging)
        return reply_task.result()

    @staticmethod
    def _check_reply(result: Any, prefill: WorkerCard) -> None:
        error = getattr(result, "error", None)
        if error is None:
            return
        if getattr(result, "error_param", None):
            raise RequestRejected(error, result.error_param)
        raise RemoteFailure(f"prefill worker {prefill.worker_id}: {error}")

    async def _remote_prefill(
        self, prefill: WorkerCard, request: GenerateRequest, media: Any = None
    ) -> tuple[KvReservation, PrefillResult]:
        assert self._nc is not None
        reservation = await self._reserve(request, media)
        subject = prefill_subject(self.deployment, prefill.worker_id)

        async def send(ticket: dict[str, Any], timeout: float) -> PrefillResult:
            message = RemotePrefillRequest(
                request=request, ticket=ticket, skip_blocks=reservation.skip_blocks,
                decode_worker_id=self.worker_id,
            )  # fmt: skip
            answer = await self._nc.request(
                subject, message.model_dump_json().encode(), timeout=timeout
            )
            return PrefillResult.model_validate_json(answer.data)

        try:
            result = await self._receive_kv(reservation, prefill, send)
        except BaseException:
            await self.kv.release_reservation(reservation)
            raise
        logger.debug(
            "%s %s: %d block(s) from %s, %d reused", self.tag, request.request_id,
            reservation.num_missing_blocks, prefill.worker_id, reservation.skip_blocks,
        )  # fmt: skip
        return reservation, result

    async def _decode(
        self, reservation: KvReservation, first: GenerateOutput, state: str | None, reply: str,
        media: Any = None,
    ) -> None:
        """Run the imported prompt from its first token; stream every later chunk."""
        finished = False
        async for output in self.kv.decode_reserved(reservation, first, state, media):
            await self._publish(reply, output)
            finished = output.finish_reason is not None
        if not finished:
            await self._reply_error(
                reply, reservation.request_id, "decode stream ended early", None
            )

    async def _decode_handoff(self, handoff: DecodeHandoff) -> None:
        request, reply = handoff.request, handoff.reply
        prefill = self.directory.workers.get(handoff.prefill_worker_id)
        try:
            if prefill is None:
                raise RemoteFailure(f"prefill worker {handoff.prefill_worker_id} is gone")
            media_task = self._prepare_beside(request)
            try:
                reservation = await self._reserve(request)
            except BaseException:
                media_task.cancel()
                raise
            subject = kv_push_subject(self.deployment, prefill.worker_id)

            async def send(ticket: dict[str, Any], timeout: float) -> KvPushResult:
                message = KvPushRequest(
                    hold_id=handoff.hold_id, ticket=ticket, skip_blocks=reservation.skip_blocks
                )
                answer = await self._nc.request(
                    subject, message.model_dump_json().encode(), timeout=timeout
                )
                return KvPushResult.model_validate_json(answer.data)

            try:
                await self._receive_kv(reservation, prefill, send)
                media = await media_task
            except BaseException:
                media_task.cancel()
                await self.kv.release_reservation(reservation)
                raise
            await self._decode(reservation, handoff.first, handoff.generator_state, reply, media)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.engine.abort(request.request_id)
            raise
        except ValueError as exc:  # the request's media are bad
            await self._reply_error(reply, request.request_id, str(exc), error_param(exc))
        except Exception as exc:
            logger.warning("%s handoff of %s failed: %s", self.tag, request.request_id, exc)
            await self._reply_error(
                reply, request.request_id, f"KV transfer from prefill failed: {exc}", None
            )

    # ----- prefill role ------------------------------------------------------------------

    async def _prefill(self, request: GenerateRequest) -> HeldPrefill:
        media = await self.prepare_media(request)  # ValueError: the request is bad
        try:
            return await self.kv.prefill_and_hold(request, media)
        except RuntimeError as exc:
            raise RemoteFailure(str(exc)) from exc

    async def _export(self, held: HeldPrefill, skip_blocks: int) -> torch.Tensor:
        return await self.kv.export_held(held, skip_blocks)

    def _maybe_crash(self) -> None:
        if os.environ.get(FAULT_ENV) in (self.worker_id, "*"):
            logger.error("%s %s set: exiting abruptly mid-transfer", self.tag, FAULT_ENV)
            os._exit(17)

    async def _prefill_for(self, message: RemotePrefillRequest) -> PrefillResult:
        assert self.transport is not None
        if message.ticket is None:
            raise RuntimeError("RemotePrefillRequest without a KV ticket")
        held = await self._prefill(message.request)
        staging = await self._export(held, message.skip_blocks)
        self._maybe_crash()
        await self.transport.push(message.ticket, staging, self.layout)
        return PrefillResult(request_id=message.request.request_id, first=held.first,
                             generator_state=held.sampler_state)  # fmt: skip

    async def _serve_prefill_first(self, request: GenerateRequest, reply: str) -> None:
        rid = request.request_id
        try:
            held = await self._prefill(request)
        except ValueError as exc:
            await self._reply_error(reply, rid, str(exc), error_param(exc))
            return
        await self._publish(reply, held.first)
        if held.first.finish_reason is not None:
            await self.kv.release_held(held)
            return
        hold_id = f"{rid}-{uuid.uuid4().hex[:8]}"
        expire = asyncio.get_running_loop().call_later(
            self.disagg.transfer_timeout_s, self._expire_hold, hold_id
        )
        self._holds[hold_id] = (held, expire)
        handoff = DecodeHandoff(
            request=request, first=held.first, generator_state=held.sampler_state, reply=reply,
            prefill_worker_id=self.worker_id, hold_id=hold_id,
        )  # fmt: skip
        why = await self._hand_off(handoff)
        if why is None:
            return
        self._expire_hold(hold_id)
        await self._reply_error(reply, rid, f"handoff to a decode worker failed: {why}", None)

    def _expire_hold(self, hold_id: str) -> None:
        held = self._holds.pop(hold_id, None)
        if held is None:
            return
        prefilled, timer = held
        timer.cancel()
        self._spawn(self.kv.release_held(prefilled))

    async def _on_kv_push(self, msg) -> None:
        self._spawn(self._kv_push_task(msg))

    async def _kv_push_task(self, msg) -> None:
        assert self._nc is not None and self.transport is not None
        try:
            message = KvPushRequest.model_validate_json(msg.data)
            held = self._holds.pop(message.hold_id, None)
            if held is None:
                raise RuntimeError(f"KV of {message.hold_id} is no longer held (expired?)")
            prefilled, timer = held
            timer.cancel()
            staging = await self._export(prefilled, message.skip_blocks)
            self._maybe_crash()
            await self.transport.push(message.ticket, staging, self.layout)
            result = KvPushResult(ok=True)
        except Exception as exc:
            logger.warning("%s KV push failed: %s", self.tag, exc)
            result = KvPushResult(ok=False, error=str(exc))
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, result.model_dump_json().encode())

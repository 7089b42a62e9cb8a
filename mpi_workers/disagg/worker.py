"""`DisaggWorker`: a `Worker` in the prefill or decode role, moving KV between the two.

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

Tensor parallelism: the transfer endpoint is the group leader's; the KV on the wire always
holds every global KV head, and the leader scatters (decode) or gathers (prefill) the ranks'
head shards on the stepping thread (`kv_transfer.shards`), so prefill and decode TP may differ.

Test hook: `HPCSERVE_FAULT_PREFILL_EXIT=<worker_id>` makes that prefill worker exit abruptly
after computing a prefill and before pushing its KV (a crash mid-transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import uuid
from typing import Any

import torch
from nats.errors import NoRespondersError

from contract.config import DisaggregationConfig
from contract.disagg import (
    DecodeHandoff,
    KvPushRequest,
    KvPushResult,
    PrefillResult,
    RemotePrefillRequest,
    decode_subject,
    kv_push_subject,
    prefill_subject,
)
from contract.discovery import KvTransferInfo, WorkerCard, WorkerDirectory
from contract.messages import AbortRequest, GenerateOutput, GenerateRequest
from mpi_workers.engine.torch import disagg_ops as ops
from mpi_workers.kv_transfer import KvTransport, make_transport
from mpi_workers.kv_transfer.blocks import pack_blocks, unpack_blocks
from mpi_workers.worker import Worker, error_param

logger = logging.getLogger(__name__)

FAULT_ENV = "HPCSERVE_FAULT_PREFILL_EXIT"
RESERVE_WAIT_S = 30.0  # how long a decode worker waits for free blocks before failing


class RemoteFailure(RuntimeError):
    """A remote prefill or KV transfer failed in a way another prefill worker may not."""


class RequestRejected(ValueError):
    """The prefill worker rejected the request itself (bad parameter): do not retry."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


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


class DisaggWorker(Worker):
    def __init__(
        self, engine: Any, *, disaggregation: DisaggregationConfig, **kwargs: Any
    ) -> None:
        super().__init__(engine, **kwargs)
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"DisaggWorker serves roles prefill/decode, not {self.role!r}")
        self.disagg = disaggregation
        self.strategy = disaggregation.strategy or "decode_first"
        self.transport: KvTransport | None = None
        self.directory = WorkerDirectory(self.etcd_endpoint, self.deployment)
        self.layout = ops.kv_layout(engine)
        self._round_robin = itertools.count()
        self._holds: dict[str, tuple[Any, asyncio.TimerHandle]] = {}
        self._handed_off: dict[str, WorkerCard] = {}
        self._gone_waiters: dict[str, set[asyncio.Event]] = {}
        self.tag = f"[{self.role} {self.worker_id}]"

    @property
    def card(self) -> WorkerCard:
        card = super().card
        if self.transport is not None:
            card.kv_transfer = KvTransferInfo(
                backend=self.transport.backend, address=self.transport.address
            )
        return card

    async def start(self) -> None:
        self.transport = make_transport(self.disagg.kv_transfer, name=self.worker_id)
        await self.transport.start(kv_host())
        self.directory.add_listener(self._on_workers_changed)
        await self.directory.start()
        await super().start()
        assert self._nc is not None
        if self.role == "prefill":
            subjects = {
                prefill_subject(self.deployment, self.worker_id): self._on_remote_prefill,
                kv_push_subject(self.deployment, self.worker_id): self._on_kv_push,
            }
        else:
            subjects = {decode_subject(self.deployment, self.worker_id): self._on_handoff}
        for subject, callback in subjects.items():
            self._subscriptions.append(await self._nc.subscribe(subject, cb=callback))
        logger.info(
            "%s %s strategy, KV over %s at %s", self.tag, self.strategy,
            self.transport.backend, self.transport.address,
        )  # fmt: skip

    async def stop(self) -> None:
        await super().stop()
        for seq, timer in list(self._holds.values()):
            timer.cancel()
            ops.free_on_thread(self.engine, seq)  # the stepping thread has stopped
        self._holds.clear()
        await self.directory.stop()
        if self.transport is not None:
            await self.transport.close()

    # ----- discovery ---------------------------------------------------------------------

    def _on_workers_changed(self, workers: dict[str, WorkerCard]) -> None:
        for worker_id, events in self._gone_waiters.items():
            if worker_id not in workers:
                for event in events:
                    event.set()

    def _peers(self, role: str, exclude: set[str]) -> list[WorkerCard]:
        return sorted(
            (
                card
                for card in self.directory.workers.values()
                if card.role == role and card.worker_id not in exclude
                and card.kv_transfer is not None
            ),
            key=lambda card: card.worker_id,
        )

    def _pick(self, role: str, exclude: set[str]) -> WorkerCard | None:
        peers = self._peers(role, exclude)
        return peers[next(self._round_robin) % len(peers)] if peers else None

    @contextlib.contextmanager
    def _watch_gone(self, worker_id: str):
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
        await self._nc.publish(reply, output.model_dump_json().encode())

    # ----- decode role -------------------------------------------------------------------

    async def _serve_decode_first(self, request: GenerateRequest, reply: str) -> None:
        rid = request.request_id
        tried: set[str] = set()
        failures: list[str] = []
        while len(tried) < 2:
            prefill = self._pick("prefill", tried)
            if prefill is None:
                break
            tried.add(prefill.worker_id)
            try:
                reservation, result = await self._remote_prefill(prefill, request)
            except RequestRejected as exc:
                await self._reply_error(reply, rid, str(exc), exc.param)
                return
            except RemoteFailure as exc:
                logger.warning("%s remote prefill of %s failed: %s", self.tag, rid, exc)
                failures.append(str(exc))
                continue
            assert result.first is not None
            await self._publish(reply, result.first)
            if result.first.finish_reason is not None:
                await self._free_soon(reservation.seq)
                return
            reservation.seq.generator = ops.restore_generator(result.generator_state)
            await self._decode(reservation, result.first, reply)
            return
        if not tried:
            if self.disagg.fallback_local_prefill:
                logger.info("%s no prefill worker; prefilling %s locally", self.tag, rid)
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

    async def _reserve(self, request: GenerateRequest) -> ops.Reservation:
        engine = self.engine
        deadline = asyncio.get_running_loop().time() + RESERVE_WAIT_S
        while True:
            reservation = await engine.call_in_engine_thread(
                lambda: ops.reserve_on_thread(engine, request)
            )
            if reservation is not None:
                return reservation
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("KV pool full: no blocks free for the prompt's transfer")
            await asyncio.sleep(0.05)

    async def _import_kv(self, staging: torch.Tensor, block_ids: list[int]) -> None:
        """Write received KV (every global head) into our reserved blocks. TP 1: off the
        stepping thread (the blocks are reserved: no step touches them). TP > 1: on the
        stepping thread, which scatters each rank its heads between two steps."""
        engine = self.engine
        if self.layout.tp_size == 1:
            cache = engine.kv_cache
            await asyncio.to_thread(unpack_blocks, staging, cache.k, cache.v, block_ids)
            return
        await engine.call_in_engine_thread(
            lambda: ops.import_on_thread(engine, staging, block_ids)
        )

    async def _export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """Our held blocks' KV with every global head (TP > 1: gathered from every rank)."""
        engine = self.engine
        if self.layout.tp_size == 1:
            cache = engine.kv_cache
            return await asyncio.to_thread(pack_blocks, cache.k, cache.v, block_ids)
        return await engine.call_in_engine_thread(lambda: ops.export_on_thread(engine, block_ids))

    async def _receive_kv(
        self, reservation: ops.Reservation, prefill: WorkerCard, send: Any
    ) -> Any:
        """Expect the missing blocks, run `send(ticket)` (a NATS request to the prefill
        worker), and wait for both the reply and the data; unpack into the reserved blocks."""
        assert self.transport is not None and self._nc is not None
        transfer_id = f"{reservation.seq.request_id}-{uuid.uuid4().hex[:8]}"
        staging = ops.staging_for(self.engine, len(reservation.missing_blocks))
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
        await self._import_kv(staging, reservation.missing_blocks)
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
        self, prefill: WorkerCard, request: GenerateRequest
    ) -> tuple[ops.Reservation, PrefillResult]:
        assert self._nc is not None
        reservation = await self._reserve(request)
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
            await self._free_soon(reservation.seq)
            raise
        logger.debug(
            "%s %s: %d block(s) from %s, %d reused", self.tag, request.request_id,
            len(reservation.missing_blocks), prefill.worker_id, reservation.skip_blocks,
        )  # fmt: skip
        return reservation, result

    async def _free_soon(self, seq: Any) -> None:
        """Free on the stepping thread even when the calling task is being cancelled."""
        engine = self.engine
        task = asyncio.ensure_future(
            engine.call_in_engine_thread(lambda: ops.free_on_thread(engine, seq))
        )
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def _decode(
        self, reservation: ops.Reservation, first: GenerateOutput, reply: str
    ) -> None:
        """Run the imported sequence from its first token; stream every later chunk."""
        engine, seq = self.engine, reservation.seq
        stream = engine.stream_sequence(seq, add=False)
        try:
            await engine.call_in_engine_thread(lambda: ops.activate_on_thread(engine, seq, first))
        except BaseException:
            await stream.aclose()
            await self._free_soon(seq)
            raise
        finished = False
        async for output in stream:
            await self._publish(reply, output)
            finished = output.finish_reason is not None
        if not finished:
            await self._reply_error(reply, seq.request_id, "decode stream ended early", None)

    async def _on_handoff(self, msg) -> None:
        """prefill_first: accept a prefilled request at once, then import and decode it."""
        try:
            handoff = DecodeHandoff.model_validate_json(msg.data)
            self.engine.validate(handoff.request)
        except ValueError as exc:
            if msg.reply:
                await self._nc.publish(
                    msg.reply, KvPushResult(ok=False, error=str(exc)).model_dump_json().encode()
                )
            return
        rid = handoff.request.request_id
        # Tell the frontend this worker now owns the stream (before any chunk of ours and
        # before the prefill worker lets go), so that our leaving fails the request there.
        announce = GenerateOutput(request_id=rid, worker_id=self.worker_id)
        await self._nc.publish(handoff.reply, announce.model_dump_json().encode())
        task = asyncio.create_task(self._decode_handoff(handoff), name=rid)
        self._inflight[rid] = task
        task.add_done_callback(lambda _t, rid=rid: self._request_done(rid))
        self._metrics_changed = True
        if msg.reply:
            await self._nc.publish(msg.reply, KvPushResult(ok=True).model_dump_json().encode())

    async def _decode_handoff(self, handoff: DecodeHandoff) -> None:
        request, reply = handoff.request, handoff.reply
        prefill = self.directory.workers.get(handoff.prefill_worker_id)
        try:
            if prefill is None:
                raise RemoteFailure(f"prefill worker {handoff.prefill_worker_id} is gone")
            reservation = await self._reserve(request)
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
            except BaseException:
                await self._free_soon(reservation.seq)
                raise
            reservation.seq.generator = ops.restore_generator(handoff.generator_state)
            await self._decode(reservation, handoff.first, reply)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.engine.abort(request.request_id)
            raise
        except Exception as exc:
            logger.warning("%s handoff of %s failed: %s", self.tag, request.request_id, exc)
            await self._reply_error(
                reply, request.request_id, f"KV transfer from prefill failed: {exc}", None
            )

    # ----- prefill role ------------------------------------------------------------------

    async def _prefill(self, request: GenerateRequest) -> tuple[Any, GenerateOutput, str | None]:
        """Compute the prompt and its first token; the blocks stay held (caller frees)."""
        engine = self.engine
        seq = ops.prefill_sequence(engine, request)
        last: GenerateOutput | None = None
        tokens: list[int] = []
        logprobs: list[Any] = []
        try:
            async for output in engine.stream_sequence(seq):
                tokens.extend(output.token_ids)
                logprobs.extend(output.logprobs or [])
                last = output
        except BaseException:
            await self._free_soon(seq)
            raise
        assert last is not None
        if last.finish_reason == "error" or not tokens:
            await self._free_soon(seq)
            raise RemoteFailure(last.error or f"prefill ended with {last.finish_reason}")
        first = last.model_copy(
            update={
                "token_ids": tokens,
                "logprobs": logprobs if last.logprobs is not None else None,
                "finish_reason": ops.first_finish_reason(engine, request, tokens[0]),
            }
        )
        return seq, first, ops.generator_state(seq)

    async def _pack_and_free(self, seq: Any, num_prompt_tokens: int, skip: int) -> torch.Tensor:
        blocks = seq.block_table[skip : ops.prompt_blocks(self.engine, num_prompt_tokens)]
        try:
            return await self._export_kv(blocks)
        finally:
            await self._free_soon(seq)

    def _maybe_crash(self) -> None:
        if os.environ.get(FAULT_ENV) in (self.worker_id, "*"):
            logger.error("%s %s set: exiting abruptly mid-transfer", self.tag, FAULT_ENV)
            os._exit(17)

    def _spawn(self, coro: Any) -> None:
        """Run `coro` as a background task of this worker (cancelled at stop)."""
        task = asyncio.ensure_future(coro)
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    async def _on_remote_prefill(self, msg) -> None:
        self._spawn(self._remote_prefill_task(msg))

    async def _remote_prefill_task(self, msg) -> None:
        assert self._nc is not None and self.transport is not None
        try:
            message = RemotePrefillRequest.model_validate_json(msg.data)
        except ValueError as exc:
            logger.error("%s malformed RemotePrefillRequest: %s", self.tag, exc)
            return
        request = message.request
        try:
            self.engine.validate(request)
            seq, first, state = await self._prefill(request)
            staging = await self._pack_and_free(seq, len(request.token_ids), message.skip_blocks)
            self._maybe_crash()
            await self.transport.push(message.ticket, staging, self.layout)
            result = PrefillResult(request_id=request.request_id, first=first,
                                   generator_state=state)  # fmt: skip
        except ValueError as exc:
            result = PrefillResult(
                request_id=request.request_id, error=str(exc), error_param=error_param(exc)
            )
        except Exception as exc:
            logger.warning("%s prefill of %s failed: %s", self.tag, request.request_id, exc)
            result = PrefillResult(request_id=request.request_id, error=f"{exc}")
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, result.model_dump_json().encode())

    async def _serve_prefill_first(self, request: GenerateRequest, reply: str) -> None:
        assert self._nc is not None
        rid = request.request_id
        seq, first, state = await self._prefill(request)
        await self._publish(reply, first)
        if first.finish_reason is not None:
            await self._free_soon(seq)
            return
        hold_id = f"{rid}-{uuid.uuid4().hex[:8]}"
        expire = asyncio.get_running_loop().call_later(
            self.disagg.transfer_timeout_s, self._expire_hold, hold_id
        )
        self._holds[hold_id] = (seq, expire)
        handoff = DecodeHandoff(
            request=request, first=first, generator_state=state, reply=reply,
            prefill_worker_id=self.worker_id, hold_id=hold_id,
        )  # fmt: skip
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
            return
        self._expire_hold(hold_id)
        why = "; ".join(failures) or "no decode worker is registered"
        await self._reply_error(reply, rid, f"handoff to a decode worker failed: {why}", None)

    def _expire_hold(self, hold_id: str) -> None:
        held = self._holds.pop(hold_id, None)
        if held is None:
            return
        seq, timer = held
        timer.cancel()
        self._spawn(self._free_soon(seq))

    async def _on_kv_push(self, msg) -> None:
        self._spawn(self._kv_push_task(msg))

    async def _kv_push_task(self, msg) -> None:
        assert self._nc is not None and self.transport is not None
        try:
            message = KvPushRequest.model_validate_json(msg.data)
            held = self._holds.pop(message.hold_id, None)
            if held is None:
                raise RuntimeError(f"KV of {message.hold_id} is no longer held (expired?)")
            seq, timer = held
            timer.cancel()
            staging = await self._pack_and_free(seq, seq.num_prompt_tokens, message.skip_blocks)
            self._maybe_crash()
            await self.transport.push(message.ticket, staging, self.layout)
            result = KvPushResult(ok=True)
        except Exception as exc:
            logger.warning("%s KV push failed: %s", self.tag, exc)
            result = KvPushResult(ok=False, error=str(exc))
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, result.model_dump_json().encode())

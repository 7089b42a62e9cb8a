"""The FastAPI app: OpenAI endpoints on top of the tokenizer, the router and the worker client.

A request is validated, tokenized, routed to a worker from the etcd directory, sent over
NATS, and its token stream is detokenized (and cut at stop strings) into an OpenAI response
or SSE stream. The first chunk is awaited before the HTTP status is sent, so worker-side
input errors are real 400s even for streams. A worker lost before the first token is replaced
by another one; one lost later hands the request on to another (`frontend.migration`). A
client that goes away aborts the request on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse

from contract.config import DeploymentConfig
from contract.disagg import serving_roles
from contract.discovery import WorkerCard, WorkerDirectory
from contract.messages import GenerateOutput, GenerateRequest, SamplingParams, TokenLogprob
from contract.supervisor import SUPERVISOR_FILE
from frontend import errors
from frontend.errors import OpenAIError
from frontend.kv_index import KvIndex, KvIndexFeed
from frontend.kv_router import KvRouter
from frontend.metrics import FrontendMetrics
from frontend.migration import MigratingStream, Route
from frontend.openai_schemas import ChatCompletionRequest, CompletionRequest
from frontend.router import LoadTracker, Router, make_router
from frontend.tokenization import (
    ChatTemplateError,
    IncrementalDetokenizer,
    StopMatcher,
    TextTokenizer,
)
from frontend.worker_client import WorkerClient

logger = logging.getLogger(__name__)

T = TypeVar("T")
Kind = Literal["chat", "completion"]
_JSON = "application/json"
_SSE_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=_JSON)


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class SSEResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` callbacks however it ends.

    Starlette may cancel a stream before its generator ever started (client gone at once);
    the generator's `finally` would then never run, so the abort and the in-flight count
    are settled here instead.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: list[Callable[[], None]]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for callback in self.on_close:
                callback()


class Prepared:
    """Everything known about a request before it is sent to a worker."""

    __slots__ = (
        "arrival",
        "created",
        "include_usage",
        "kind",
        "logprobs",
        "model",
        "prompt_ids",
        "prompt_param",
        "response_id",
        "sampling",
        "stops",
        "stream",
        "user_max_tokens",
    )

    def __init__(
        self,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        model: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        arrival: float,
    ) -> None:
        self.kind = kind
        self.arrival = arrival
        self.created = int(time.time())
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.response_id = prefix + uuid.uuid4().hex
        self.model = model
        self.prompt_ids = prompt_ids
        self.prompt_param = "messages" if kind == "chat" else "prompt"
        self.sampling = sampling
        self.user_max_tokens = body.requested_max_tokens()
        self.stops = body.stop_strings()
        self.stream = body.stream
        self.include_usage = body.include_usage_in_stream()
        self.logprobs = body.requested_logprobs()


class Generation:
    """Turns GenerateOutput chunks into text deltas, logprobs, usage and a finish reason."""

    def __init__(self, state: FrontendState, prepared: Prepared) -> None:
        self._tokenizer = state.tokenizer
        self._metrics = state.metrics
        self._prepared = prepared
        self._detok = IncrementalDetokenizer(state.tokenizer, prepared.prompt_ids)
        self._stops = StopMatcher(prepared.stops)
        self.prompt_tokens = len(prepared.prompt_ids)
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._last_token_time: float | None = None

    def consume(self, output: GenerateOutput) -> tuple[str, list[TokenLogprob]]:
        """The text to emit for `output` (after stop handling) and its tokens' logprobs."""
        if output.num_prompt_tokens:
            self.prompt_tokens = output.num_prompt_tokens
        if output.num_cached_tokens:
            self.cached_tokens = output.num_cached_tokens
        logprobs = output.logprobs or []
        if self.finish_reason is not None:
            return "", []
        count = len(output.token_ids)
        if count:
            now = time.perf_counter()
            if self._last_token_time is None:
                self._metrics.ttft.observe(now - self._prepared.arrival)
            else:
                self._metrics.itl.observe((now - self._last_token_time) / count)
            self._last_token_time = now
            self.completion_tokens += count
        text = self._detok.add(output.token_ids) if count else ""
        final = output.finish_reason is not None
        if final:
            text += self._detok.finish()
        emitted, stopped = self._stops.feed(text) if text else ("", self._stops.stopped)
        if stopped:
            self.finish_reason = "stop"
        elif final:
            emitted += self._stops.flush()
            self.finish_reason = "length" if output.finish_reason == "length" else "stop"
        return emitted, logprobs

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    def record(self) -> None:
        self._metrics.prompt_tokens.inc(self.prompt_tokens)
        self._metrics.completion_tokens.inc(self.completion_tokens)
        self._metrics.duration.observe(time.perf_counter() - self._prepared.arrival)

    # ---- logprobs in OpenAI shapes --------------------------------------------------------

    def chat_logprobs(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        piece = self._tokenizer.token_piece
        content = []
        for entry in entries:
            text, raw = piece(entry.token_id)
            top = []
            for alt in entry.top:
                alt_text, alt_raw = piece(alt.token_id)
                top.append({"token": alt_text, "logprob": alt.logprob, "bytes": alt_raw})
            content.append(
                {"token": text, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top}
            )
        return content


class CompletionLogprobs:
    """Accumulates /v1/completions logprobs (tokens, token_logprobs, top_logprobs, offsets)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._piece = tokenizer.token_piece
        self.offset = 0

    def build(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        offsets: list[int] = []
        for entry in entries:
            text, _ = self._piece(entry.token_id)
            tokens.append(text)
            token_logprobs.append(entry.logprob)
            top_logprobs.append({self._piece(alt.token_id)[0]: alt.logprob for alt in entry.top})
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }


def check_config(config: DeploymentConfig) -> None:
    """ValueError naming the field when the launcher left out what the frontend needs."""
    if not config.model.path:
        raise ValueError("model.path: the frontend needs the model folder (for its tokenizer)")
    if not (Path(config.model.path) / "tokenizer.json").is_file():
        raise ValueError(f"model.path: {config.model.path} has no tokenizer.json")
    if not config.services.etcd.endpoint:
        raise ValueError("services.etcd.endpoint: the frontend needs etcd's address")
    if not config.services.nats.endpoint:
        raise ValueError("services.nats.endpoint: the frontend needs NATS's address")


class FrontendState:
    """What the endpoints share; built in the lifespan."""

    def __init__(self, config: DeploymentConfig) -> None:
        check_config(config)
        self.config = config
        model_path = str(config.model.path)
        assert config.services.etcd.endpoint and config.services.nats.endpoint
        self.served_name = config.model.served_name or Path(model_path).name
        self.tokenizer = TextTokenizer(model_path)
        self.metrics = FrontendMetrics()
        self.tracker = LoadTracker()
        self.kv_feed: KvIndexFeed | None = None
        self.router: Router
        if config.frontend.router == "kv":
            kv = config.frontend.kv_router
            self.kv_feed = KvIndexFeed(
                KvIndex(),
                nats_url=config.services.nats.endpoint,
                deployment=config.name,
                reconcile_interval_s=kv.reconcile_interval_s,
            )
            self.router = KvRouter(kv, self.kv_feed.index, self.tracker)
            self.metrics.track_kv_index(self.kv_feed.index.num_blocks)
        else:
            self.router = make_router(config.frontend.router, self.tracker)
        if config.run_dir:  # restarts as the deployment's supervisor records them
            self.metrics.track_supervisor(Path(config.run_dir) / SUPERVISOR_FILE)
        self.directory = WorkerDirectory(config.services.etcd.endpoint, config.name)
        self.client = WorkerClient(config.services.nats.endpoint, config.name, self.tracker)
        self.started = int(time.time())
        self._worker_joined = asyncio.Event()

    async def start(self) -> None:
        await self.client.start()
        self.directory.add_listener(self.client.on_workers_changed)
        self.directory.add_listener(self._on_workers_changed)
        if self.kv_feed is not None:  # before the first sync: every worker gets a snapshot
            await self.kv_feed.start()
            self.directory.add_listener(self.kv_feed.on_workers_changed)
            assert isinstance(self.router, KvRouter)
            self.directory.add_listener(self.router.on_workers_changed)
        await self.directory.start()

    async def stop(self) -> None:
        await self.directory.stop()
        if self.kv_feed is not None:
            await self.kv_feed.stop()
        await self.client.stop()

    def _on_workers_changed(self, workers: dict[str, WorkerCard]) -> None:
        if workers:
            self._worker_joined.set()
        else:
            self._worker_joined.clear()

    @property
    def serving_roles(self) -> tuple[str, ...]:
        """agg, plus the disaggregation strategy's entry role (decode or prefill)."""
        return serving_roles(self.config.disaggregation.strategy)

    def candidates(self, exclude: set[str]) -> list[WorkerCard]:
        """Routable workers of the serving roles; `exclude` holds worker instances."""
        roles = self.serving_roles
        return [
            card
            for card in self.directory.workers.values()
            if card.role in roles and card.instance not in exclude and not card.draining
        ]

    def check_disaggregated_peer(self, card: WorkerCard) -> None:
        """503 when `card` needs the other half of a disaggregated pair and none is up."""
        if card.role not in ("prefill", "decode"):
            return
        peer = "decode" if card.role == "prefill" else "prefill"
        if peer == "prefill" and self.config.disaggregation.fallback_local_prefill:
            return
        if not any(c.role == peer for c in self.directory.workers.values()):
            raise errors.no_worker(
                f"no {peer} worker is registered for deployment {self.config.name!r}: "
                f"{card.role} workers cannot serve alone; retry when one is up"
            )

    async def pick_worker(self, request: GenerateRequest, exclude: set[str]) -> WorkerCard:
        """A worker from the directory; waits up to no_worker_timeout_s, then 503."""
        candidates = self.candidates(exclude)
        wait_s = self.config.frontend.no_worker_timeout_s
        if not candidates and wait_s > 0:
            deadline = asyncio.get_running_loop().time() + wait_s
            while not candidates:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._worker_joined.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 0.25)):
                        await self._worker_joined.wait()
                candidates = self.candidates(exclude)
        if not candidates:
            if exclude:
                raise errors.no_worker(
                    "no worker is available: the worker serving this request left and no "
                    "other worker is registered"
                )
            raise errors.no_worker(
                f"no worker is registered for deployment {self.config.name!r}; "
                "retry when /health says ok"
            )
        candidates = able_workers(candidates, request)
        card = self.router.choose(candidates, request)
        self.check_disaggregated_peer(card)
        return card


def able_workers(candidates: list[WorkerCard], request: GenerateRequest) -> list[WorkerCard]:
    """The candidates whose engine honours every sampling field `request` sets (away from
    its default); 400 naming the field when none does (an engine declares what it cannot
    do in its card: the mocker has no logprobs)."""
    if not any(card.unsupported_params for card in candidates):
        return candidates
    sampling = request.sampling
    used = {
        name
        for name, field in SamplingParams.model_fields.items()
        if getattr(sampling, name) != field.get_default(call_default_factory=True)
    }
    able = [card for card in candidates if not used & set(card.unsupported_params)]
    if able:
        return able
    name = sorted(used & set(candidates[0].unsupported_params))[0]
    engine = candidates[0].engine or "this"
    raise errors.bad_request(
        f"{name}: the {engine} engine serving model {candidates[0].model!r} does not "
        "support this parameter",
        param=name,
    )


def _check_context(prepared: Prepared, request: GenerateRequest, card: WorkerCard) -> None:
    """400 context_length_exceeded when the prompt (+ max_tokens) does not fit the worker;
    sets `request`'s max_tokens: the user's, else all the context leaves."""
    limit = card.max_model_len
    prompt_len = len(prepared.prompt_ids)
    if prompt_len >= limit:
        raise errors.context_length_exceeded(
            f"This model's maximum context length is {limit} tokens. However, your "
            f"{prepared.prompt_param} has {prompt_len} tokens, which leaves no room for output.",
            param=prepared.prompt_param,
        )
    if prepared.user_max_tokens is not None:
        if prompt_len + prepared.user_max_tokens > limit:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_len + prepared.user_max_tokens} tokens ({prompt_len} in "
                f"the {prepared.prompt_param}, {prepared.user_max_tokens} for the completion).",
                param="max_tokens",
            )
        request.sampling.max_tokens = prepared.user_max_tokens
    else:
        request.sampling.max_tokens = limit - prompt_len


def _route_for(state: FrontendState, prepared: Prepared) -> Route:
    """The routing of `prepared`'s attempts: the router's pick, then the context check.
    A continuation (prompt + tokens so far) keeps the budget `continuation()` left it: the
    workers of a deployment share engine.max_model_len, so it fits wherever the first did."""

    async def route(request: GenerateRequest, exclude: set[str]) -> WorkerCard:
        card = await state.pick_worker(request, exclude)
        if len(request.token_ids) == len(prepared.prompt_ids):
            _check_context(prepared, request, card)
        return card

    return route


def _raise_for_worker_error(output: GenerateOutput, card: WorkerCard) -> None:
    if output.finish_reason == "error":
        message = output.error or "the worker failed the request"
        if output.error_param:
            raise errors.bad_request(message, param=output.error_param)
        raise OpenAIError(500, f"worker {card.worker_id}: {message}", type="server_error")
    if output.finish_reason == "abort":
        raise errors.no_worker(f"worker {card.worker_id} aborted the request")


async def _guard_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects meanwhile, cancel it and raise ClientGone."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


def create_app(config: DeploymentConfig) -> FastAPI:
    """The frontend app for `config`; NATS, etcd and the tokenizer are opened in its lifespan."""
    check_config(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = FrontendState(config)
        await state.start()
        app.state.frontend = state
        logger.info(
            "serving %s for deployment %s (router %s)",
            state.served_name,
            config.name,
            config.frontend.router,
        )
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="hpcserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install_handlers(app)

    def state_of(request: Request) -> FrontendState:
        return request.app.state.frontend  # type: ignore[no-any-return]

    async def live(request: Request) -> Response:
        return _json({"status": "ok"})

    async def health(request: Request) -> Response:
        state = state_of(request)
        workers = state.candidates(set())
        if not workers:
            return _json({"status": "no workers", "workers": 0}, status=503)
        return _json({"status": "ok", "workers": len(workers)})

    async def metrics(request: Request) -> Response:
        state = state_of(request)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    async def models(request: Request) -> Response:
        state = state_of(request)
        workers = state.candidates(set())
        max_len = min((card.max_model_len for card in workers), default=None)
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": state.served_name,
                        "object": "model",
                        "created": state.started,
                        "owned_by": "hpcserve",
                        "max_model_len": max_len or state.tokenizer.max_model_len,
                    }
                ],
            }
        )

    async def chat_completions(request: Request) -> Response:
        return await _serve(request, "chat")

    async def completions(request: Request) -> Response:
        return await _serve(request, "completion")

    # plain Starlette routes: FastAPI's dependency solving costs CPU on every request and
    # these endpoints parse their own bodies; exception handlers still apply
    app.router.add_route("/live", live, methods=["GET"])
    app.router.add_route("/health", health, methods=["GET"])
    app.router.add_route("/metrics", metrics, methods=["GET"])
    app.router.add_route("/v1/models", models, methods=["GET"])
    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.router.add_route("/v1/completions", completions, methods=["POST"])

    async def _serve(request: Request, kind: Kind) -> Response:
        state = state_of(request)
        endpoint = "chat" if kind == "chat" else "completions"
        state.metrics.in_flight.inc()
        status = "500"
        streaming = False
        try:
            response = await _handle(state, request, kind)
            status = str(response.status_code)
            if isinstance(response, SSEResponse):
                streaming = True
                response.on_close.append(state.metrics.in_flight.dec)
            return response
        except OpenAIError as exc:
            status = str(exc.status)
            raise
        except ClientGone:
            status = "499"
            return Response(status_code=499)
        except ValidationError:
            status = "400"
            raise
        finally:
            state.metrics.requests.labels(endpoint, status).inc()
            if not streaming:
                state.metrics.in_flight.dec()

    async def _handle(state: FrontendState, request: Request, kind: Kind) -> Response:
        arrival = time.perf_counter()
        data = errors.parse_json_body(await request.body())
        body: ChatCompletionRequest | CompletionRequest
        if kind == "chat":
            body = ChatCompletionRequest.model_validate(data)
        else:
            body = CompletionRequest.model_validate(data)
        if body.model is not None and body.model != state.served_name:
            raise errors.model_not_found(body.model)
        prompt_ids = _prompt_ids(state, body)
        prepared = Prepared(
            kind, body, state.served_name, prompt_ids, _sampling(state, body), arrival
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.frontend.request_timeout_s
        if prepared.stream:
            stream, first = await _guard_disconnect(request, _start(state, prepared, deadline))
            return SSEResponse(
                _stream_events(state, prepared, stream, first, deadline), [stream.close]
            )
        return await _guard_disconnect(request, _complete(state, prepared, deadline))

    def _prompt_ids(
        state: FrontendState, body: ChatCompletionRequest | CompletionRequest
    ) -> list[int]:
        tokenizer = state.tokenizer
        if isinstance(body, ChatCompletionRequest):
            # most HF templates know no "developer" role; it is OpenAI's new name for system
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
            try:
                ids = tokenizer.encode_chat(messages)
            except ChatTemplateError as exc:
                raise errors.bad_request(str(exc), param="messages") from None
            param = "messages"
        else:
            prompt = body.prompt
            param = "prompt"
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt, add_special_tokens=True)
            else:
                vocab = tokenizer.vocab_size
                bad = next((t for t in prompt if not 0 <= t < vocab), None)  # type: ignore[operator]
                if bad is not None:
                    raise errors.bad_request(
                        f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                        param="prompt",
                    )
                ids = list(prompt)  # type: ignore[arg-type]
        if not ids:
            raise errors.bad_request(f"{param}: the prompt is empty", param=param)
        return ids

    def _sampling(
        state: FrontendState, body: ChatCompletionRequest | CompletionRequest
    ) -> SamplingParams:
        params = SamplingParams(
            ignore_eos=body.ignore_eos,
            stop_token_ids=[] if body.ignore_eos else list(state.tokenizer.eos_token_ids),
            seed=body.seed,
            logprobs=body.requested_logprobs(),
        )
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(body, name)
            if value is not None:
                setattr(params, name, value)
        return params

    async def _start(
        state: FrontendState, prepared: Prepared, deadline: float
    ) -> tuple[MigratingStream, GenerateOutput]:
        """Send to a worker and wait for its first chunk (a worker error there is an HTTP
        error, even for a stream)."""
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            token_ids=prepared.prompt_ids,
            sampling=prepared.sampling,
        )
        stream = MigratingStream(
            state.client,
            _route_for(state, prepared),
            request,
            limit=config.frontend.migration_limit,
            metrics=state.metrics,
        )
        try:
            first = await stream.next(deadline)
            _raise_for_worker_error(first, stream.card)
        except TimeoutError:
            stream.close()
            raise errors.timed_out(config.frontend.request_timeout_s) from None
        except BaseException:
            stream.close()
            raise
        return stream, first

    async def _complete(state: FrontendState, prepared: Prepared, deadline: float) -> Response:
        stream, output = await _start(state, prepared, deadline)
        generation = Generation(state, prepared)
        text_parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        try:
            while True:
                text, entries = generation.consume(output)
                if text:
                    text_parts.append(text)
                if entries and prepared.logprobs is not None:
                    logprobs.extend(entries)
                if generation.finish_reason is not None:
                    break
                output = await stream.next(deadline)
                _raise_for_worker_error(output, stream.card)
        except TimeoutError:
            raise errors.timed_out(config.frontend.request_timeout_s) from None
        finally:
            stream.close()
        generation.record()
        return _json(
            _full_response(state, prepared, generation, "".join(text_parts), logprobs, stream.card)
        )

    def _full_response(
        state: FrontendState,
        prepared: Prepared,
        generation: Generation,
        text: str,
        logprobs: list[TokenLogprob],
        card: WorkerCard,
    ) -> dict[str, Any]:
        choice: dict[str, Any]
        if prepared.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": (
                    {"content": generation.chat_logprobs(logprobs)}
                    if prepared.logprobs is not None
                    else None
                ),
                "finish_reason": generation.finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": (
                    CompletionLogprobs(state.tokenizer).build(logprobs)
                    if prepared.logprobs is not None
                    else None
                ),
                "finish_reason": generation.finish_reason,
            }
            obj = "text_completion"
        response: dict[str, Any] = {
            "id": prepared.response_id,
            "object": obj,
            "created": prepared.created,
            "model": prepared.model,
            "choices": [choice],
            "usage": generation.usage(),
            "system_fingerprint": None,
        }
        if card.simulated:
            response["simulated"] = True
        return response

    async def _stream_events(
        state: FrontendState,
        prepared: Prepared,
        stream: MigratingStream,
        output: GenerateOutput,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        """SSE events: (chat) a role chunk, content chunks, the finish chunk, usage, [DONE]."""
        generation = Generation(state, prepared)
        chat = prepared.kind == "chat"
        head: dict[str, Any] = {
            "id": prepared.response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": prepared.created,
            "model": prepared.model,
        }
        if stream.card.simulated:
            head["simulated"] = True
        completion_logprobs = CompletionLogprobs(state.tokenizer) if not chat else None
        want_logprobs = prepared.logprobs is not None

        def event(text: str | None, entries: list[TokenLogprob], finish: str | None) -> bytes:
            choice: dict[str, Any]
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                if want_logprobs and entries:
                    choice["logprobs"] = {"content": generation.chat_logprobs(entries)}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                if want_logprobs and entries and completion_logprobs is not None:
                    choice["logprobs"] = completion_logprobs.build(entries)
            chunk = dict(head)
            chunk["choices"] = [choice]
            if prepared.include_usage:
                chunk["usage"] = None
            return _sse(chunk)

        try:
            if chat:
                role_chunk = dict(head)
                role_chunk["choices"] = [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
                if prepared.include_usage:
                    role_chunk["usage"] = None
                yield _sse(role_chunk)
            pending_text = ""
            pending_entries: list[TokenLogprob] = []
            while True:
                text, entries = generation.consume(output)
                pending_text += text
                if want_logprobs:
                    pending_entries.extend(entries)
                finish = generation.finish_reason
                if finish is not None:
                    if pending_text or pending_entries:
                        yield event(pending_text, pending_entries, None)
                    yield event(None if chat else "", [], finish)
                    break
                # chunks that queued up while we were sending go out as one event
                if (pending_text or pending_entries) and not stream.has_pending:
                    yield event(pending_text, pending_entries, None)
                    pending_text, pending_entries = "", []
                output = await stream.next(deadline)
                _raise_for_worker_error(output, stream.card)
            generation.record()
            if prepared.include_usage:
                usage_chunk = dict(head)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = generation.usage()
                yield _sse(usage_chunk)
        except OpenAIError as exc:
            yield _sse(exc.body())
        except TimeoutError:
            yield _sse(errors.timed_out(config.frontend.request_timeout_s).body())
        finally:
            stream.close()
        yield _SSE_DONE

    return app

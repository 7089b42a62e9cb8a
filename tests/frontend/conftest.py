"""Frontend test helpers: a FAKE worker on real NATS/etcd, and the app on a real uvicorn.

`FakeEchoWorker` stands in for a real worker: it registers a WorkerCard, answers
GenerateRequests on its subject with a deterministic script of token ids, and records the
AbortRequests it receives. It has no engine and knows nothing of text.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from contract.bus import abort_subject, connect, worker_subject
from contract.config import DeploymentConfig
from contract.discovery import WorkerCard, WorkerRegistration
from contract.media import MediaUnavailable, fetch_media
from contract.messages import (
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    TokenLogprob,
    TopLogprob,
)
from frontend.app import create_app

EOS_ID = 2
# what the fake "generates": token ids of this text (the real tokenizer's), then EOS
SCRIPT_TEXT = "Hello there! 😀 世界 is 'world'. STOP here, then more text follows."


@dataclass
class FakeBehaviour:
    """How a FakeEchoWorker answers."""

    script: list[int] = field(default_factory=list)
    delay_s: float = 0.0  # between tokens
    silent: bool = False  # receive requests but never answer
    tokens_per_chunk: int = 1
    error_on_seed: int | None = None  # answer a request with this seed by a ValueError
    max_model_len: int = 8192
    simulated: bool = False
    unsupported_params: list[str] = field(default_factory=list)  # declared in the card
    listen: bool = True  # False: registered but not subscribed (a dead worker, lease alive)
    garbage: bool = False  # answer with bytes that are not a GenerateOutput
    media: list[str] = field(default_factory=list)  # media kinds in the card; fetched if any
    tasks: list[str] = field(default_factory=lambda: ["generate"])  # in the card


class FakeEchoWorker:
    """A FAKE worker: deterministic token stream, honours aborts, registered in etcd."""

    def __init__(
        self,
        nats_url: str,
        etcd_endpoint: str,
        deployment: str,
        worker_id: str,
        behaviour: FakeBehaviour,
    ) -> None:
        self.nats_url = nats_url
        self.etcd_endpoint = etcd_endpoint
        self.deployment = deployment
        self.worker_id = worker_id
        self.behaviour = behaviour
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.fetched: dict[str, bytes] = {}  # media_id -> payload pulled from the frontend
        self.received = asyncio.Event()
        self.abort_received = asyncio.Event()
        self._abort_flags: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._nc: Any = None
        self._registration: WorkerRegistration | None = None

    @property
    def card(self) -> WorkerCard:
        return WorkerCard(
            worker_id=self.worker_id,
            role="agg",
            model="fake",
            block_size=16,
            subject=worker_subject(self.deployment, self.worker_id),
            abort_subject=abort_subject(self.deployment, self.worker_id),
            capacity=8,
            max_model_len=self.behaviour.max_model_len,
            simulated=self.behaviour.simulated,
            engine="fake",
            unsupported_params=self.behaviour.unsupported_params,
            media=self.behaviour.media,
            tasks=self.behaviour.tasks,
        )

    async def start(self, register: bool = True) -> FakeEchoWorker:
        self._nc = await connect(self.nats_url, f"fake-{self.worker_id}")
        card = self.card
        if self.behaviour.listen:
            await self._nc.subscribe(card.subject, cb=self._on_generate)
            await self._nc.subscribe(card.abort_subject, cb=self._on_abort)
        await self._nc.flush()
        if register:
            await self.register()
        return self

    async def register(self) -> None:
        self._registration = WorkerRegistration(
            self.etcd_endpoint, self.deployment, self.card, ttl_s=5
        )
        await self._registration.open()

    async def deregister(self) -> None:
        """Revoke the lease now: the worker leaves the directory as if its lease lapsed."""
        if self._registration is not None:
            await self._registration.close()
            self._registration = None

    async def stop(self) -> None:
        await self.deregister()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._nc.close()

    async def _on_generate(self, msg: Any) -> None:
        request = GenerateRequest.model_validate_json(msg.data)
        self.requests.append(request)
        self.received.set()
        if self.behaviour.silent:
            return
        task = asyncio.get_running_loop().create_task(self._answer(request, msg.reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_abort(self, msg: Any) -> None:
        abort = AbortRequest.model_validate_json(msg.data)
        self.aborted.append(abort.request_id)
        self._abort_flags.add(abort.request_id)
        self.abort_received.set()

    async def _answer(self, request: GenerateRequest, reply: str) -> None:
        sampling = request.sampling
        rid = request.request_id
        if self.behaviour.garbage:
            await self._nc.publish(reply, b'{"tokens": "not a GenerateOutput"}')
            return
        for ref in request.media:  # as a real worker does before computing the prompt
            try:
                self.fetched[ref.media_id] = await fetch_media(
                    self._nc, ref.subject, ref.media_id, ref.nbytes, ref.content_hash, 10.0
                )
            except MediaUnavailable as exc:
                out = GenerateOutput(request_id=rid, finish_reason="error", error=str(exc))
                await self._nc.publish(reply, out.model_dump_json().encode())
                return
        if (
            self.behaviour.error_on_seed is not None
            and sampling.seed == self.behaviour.error_on_seed
        ):
            out = GenerateOutput(
                request_id=rid,
                finish_reason="error",
                error=f"seed: {sampling.seed} is not allowed by this fake",
                error_param="seed",
            )
            await self._nc.publish(reply, out.model_dump_json().encode())
            return
        script = list(self.behaviour.script)
        if not sampling.ignore_eos:
            script.append(EOS_ID)
        else:
            script = (script * (1 + sampling.max_tokens // max(len(script), 1)))[:]
        produced = 0
        position = 0
        first = True
        while True:
            if self.behaviour.delay_s:
                await asyncio.sleep(self.behaviour.delay_s)
            if rid in self._abort_flags:
                return  # aborted: stop quietly, as a real worker would
            chunk: list[int] = []
            finish: str | None = None
            while len(chunk) < self.behaviour.tokens_per_chunk:
                token = script[position]
                position += 1
                chunk.append(token)
                produced += 1
                if token in sampling.stop_token_ids and not sampling.ignore_eos:
                    finish = "stop"
                    break
                if produced >= sampling.max_tokens:
                    finish = "length"
                    break
            logprobs = None
            if sampling.logprobs is not None:
                logprobs = [
                    TokenLogprob(
                        token_id=token,
                        logprob=-0.25,
                        top=[
                            TopLogprob(token_id=token + k, logprob=-0.25 - k)
                            for k in range(sampling.logprobs)
                        ],
                    )
                    for token in chunk
                ]
            out = GenerateOutput(
                request_id=rid,
                token_ids=chunk,
                logprobs=logprobs,
                finish_reason=finish,  # type: ignore[arg-type]
                num_prompt_tokens=len(request.token_ids) if first else 0,
            )
            first = False
            await self._nc.publish(reply, out.model_dump_json().encode())
            if finish is not None:
                return


@dataclass
class FrontendHarness:
    """A running frontend (real uvicorn on a free port) plus ways to add fake workers."""

    config: DeploymentConfig
    base_url: str
    app: Any
    nats_url: str
    etcd_endpoint: str
    script: list[int]
    workers: list[FakeEchoWorker] = field(default_factory=list)

    async def add_worker(
        self, worker_id: str | None = None, register: bool = True, **behaviour: Any
    ) -> FakeEchoWorker:
        behaviour.setdefault("script", self.script)
        worker = FakeEchoWorker(
            self.nats_url,
            self.etcd_endpoint,
            self.config.name,
            worker_id or f"fake-{uuid.uuid4().hex[:8]}",
            FakeBehaviour(**behaviour),
        )
        await worker.start(register=register)
        self.workers.append(worker)
        if register:
            await self.wait_for_workers(lambda ids: worker.worker_id in ids)
        return worker

    async def wait_for_workers(
        self, predicate: Callable[[set[str]], bool], timeout_s: float = 10.0
    ) -> None:
        """Until the frontend's own directory view satisfies `predicate`."""
        state = self.app.state.frontend
        async with asyncio.timeout(timeout_s):
            while not predicate(set(state.directory.workers)):
                await asyncio.sleep(0.01)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, timeout=kwargs.pop("timeout", 30), **kwargs
        )


async def start_frontend(
    config: DeploymentConfig,
) -> tuple[uvicorn.Server, asyncio.Task[None], Any]:
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            access_log=False,
            log_level="warning",
            lifespan="on",
        )
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during start-up")
                await asyncio.sleep(0.01)
    except BaseException:  # never leave a half-started server running
        server.should_exit = True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    return server, task, app


def server_port(server: uvicorn.Server) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])


@pytest.fixture
async def make_frontend(
    etcd_endpoint: str, nats_url: str, model_dir: Path
) -> AsyncIterator[Callable[..., Awaitable[FrontendHarness]]]:
    """Factory: `await make_frontend(router=..., no_worker_timeout_s=...)`; stopped at the end."""
    started: list[tuple[uvicorn.Server, asyncio.Task[None], FrontendHarness]] = []
    from frontend.tokenization import TextTokenizer

    script = TextTokenizer(model_dir).encode(SCRIPT_TEXT, add_special_tokens=False)

    async def factory(
        model: Path | None = None,
        served_name: str = "smol",
        multimodal: dict[str, Any] | None = None,
        chat_template: str | None = None,
        model_settings: dict[str, Any] | None = None,
        **frontend: Any,
    ) -> FrontendHarness:
        """`model_settings`: more `model.*` fields (task, pooler)."""
        config = DeploymentConfig.model_validate(
            {
                "name": f"test-{uuid.uuid4().hex[:10]}",
                "model": {
                    "path": str(model or model_dir),
                    "served_name": served_name,
                    "chat_template": chat_template,
                    **(model_settings or {}),
                },
                "multimodal": multimodal or {},
                "frontend": {"port": 0, **frontend},
                "services": {
                    "etcd": {"start": False, "endpoint": etcd_endpoint},
                    "nats": {"start": False, "endpoint": nats_url},
                },
            }
        )
        server, task, app = await start_frontend(config)
        harness = FrontendHarness(
            config=config,
            base_url=f"http://127.0.0.1:{server_port(server)}",
            app=app,
            nats_url=nats_url,
            etcd_endpoint=etcd_endpoint,
            script=script,
        )
        started.append((server, task, harness))
        return harness

    yield factory
    for server, task, harness in started:
        for worker in harness.workers:
            await worker.stop()
        server.should_exit = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await task

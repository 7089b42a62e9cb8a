"""What the endpoints share: the tokenizer, the worker directory and client, the router,
the metrics; and the choice of a worker for a request (`pick_worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.bus import media_subject
from contract.config import LOAD_READING_ROUTERS, DeploymentConfig
from contract.disagg import serving_roles
from contract.discovery import WorkerCard, WorkerDirectory
from contract.media import serve_media
from contract.messages import GenerateRequest, SamplingParams
from contract.plan import FRONTEND_PROCESS_ENV
from contract.supervisor import SUPERVISOR_FILE
from contract.vlm import VlmInfo, load_vlm_info
from frontend import errors
from frontend.chat_templates import chat_template_file
from frontend.kv_index import KvIndex, KvIndexFeed
from frontend.kv_router import KvRouter
from frontend.load_share import LoadShare
from frontend.load_table import (
    SharedRouting,
    SharedTurns,
    TableLoadShare,
    process_load_share,
)
from frontend.media import MediaIntake
from frontend.media_store import MediaStore
from frontend.metrics import FrontendMetrics
from frontend.reasoning import FORMATS as REASONING_FORMATS
from frontend.response_store import ResponseStore
from frontend.rotation import SharedRotation, process_rotation
from frontend.router import LoadTracker, Router, make_router
from frontend.tokenization import TextTokenizer
from frontend.tool_calls import FORMATS
from frontend.worker_client import WorkerClient

if TYPE_CHECKING:  # it builds answers, which read this state: the app gives it one
    from frontend.background import BackgroundResponses


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


def process_slot() -> tuple[int, int]:
    """(index, count) of this process among the frontend processes sharing the port, from
    the plan's environment (`contract.plan.frontend_plan`); (0, 1) when it runs alone."""
    value = os.environ.get(FRONTEND_PROCESS_ENV, "")
    if not value:
        return 0, 1
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise ValueError(f"{FRONTEND_PROCESS_ENV}={value!r}: expected INDEX/COUNT") from None
    if not 0 <= index < count:
        raise ValueError(f"{FRONTEND_PROCESS_ENV}={value!r}: index outside 0..count-1")
    return index, count


class FrontendState:
    """What the endpoints share; built in the lifespan."""

    background: BackgroundResponses  # /v1/responses' background runs (set by the app)

    def __init__(self, config: DeploymentConfig) -> None:
        check_config(config)
        self.config = config
        model_path = str(config.model.path)
        assert config.services.etcd.endpoint and config.services.nats.endpoint
        self.served_name = config.model.served_name or Path(model_path).name
        template = config.model.chat_template
        self.tokenizer = TextTokenizer(
            model_path, chat_template_file(template) if template else None
        )
        parser = config.frontend.tool_call_parser
        if parser is not None:  # its markers may be special tokens: kept in the output
            self.tokenizer.keep_in_text(FORMATS[parser].tokens)
        thinking = config.frontend.reasoning_parser
        self.reasoning_format = REASONING_FORMATS[thinking] if thinking is not None else None
        # the tags' ids where each is one token (usage counts the thinking by them)
        self.reasoning_tokens: tuple[int | None, int | None] = (None, None)
        if self.reasoning_format is not None:  # Magistral's tags are special tokens
            start, end = self.reasoning_format.start, self.reasoning_format.end
            self.tokenizer.keep_in_text([start, end])
            single = self.tokenizer.single_token_id
            self.reasoning_tokens = (single(start), single(end))
        try:
            self.vlm: VlmInfo | None = load_vlm_info(model_path)
        except ValueError as exc:
            raise ValueError(f"model.path: {model_path}: {exc}") from None
        # images: checked here, held in the store, fetched by the workers from this
        # process's own media subject (several frontend processes: one subject each)
        self.frontend_id = uuid.uuid4().hex[:12]
        self.media_subject = media_subject(config.name, self.frontend_id)
        mm = config.multimodal
        self.media_intake = MediaIntake(mm, self.vlm) if self.vlm is not None else None
        self.metrics = FrontendMetrics()
        self.media_store = MediaStore(
            mm.store_max_bytes, ttl_s=config.frontend.request_timeout_s + 60.0,
            on_size=self.metrics.media_store_bytes.set,
        )  # fmt: skip
        self._media_subscription: Any = None
        self.tracker = LoadTracker()
        self.process_index, self.process_count = process_slot()
        self.rotation: Iterator[int] | None = None  # round robin's tickets
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
            published = self.kv_feed.published
            self.router = KvRouter(
                kv, self.kv_feed.index, self.tracker, publishes=published.__contains__
            )
            self.metrics.track_kv_index(self.kv_feed.index.num_held)
        else:
            if config.frontend.router == "round_robin":  # one rotation over all processes
                self.rotation = process_rotation(self.process_count)
            self.router = make_router(config.frontend.router, self.tracker, self.rotation)
        if config.run_dir:  # restarts as the deployment's supervisor records them
            self.metrics.track_supervisor(Path(config.run_dir) / SUPERVISOR_FILE)
        self.directory = WorkerDirectory(config.services.etcd.endpoint, config.name)
        self.response_store = ResponseStore(
            config.services.etcd.endpoint, config.name,
            config.frontend.responses_store_ttl_s, config.frontend.responses_store_max_bytes,
        )  # fmt: skip
        # round robin and random read no load: their processes neither share counts nor parse
        # load reports (work that grows with the deployment's rate; benchmarks/README.md)
        routes_by_load = config.frontend.router in LOAD_READING_ROUTERS
        self.client = WorkerClient(
            config.services.nats.endpoint,
            config.name,
            self.tracker,
            busy_poll_s=config.frontend.busy_poll_us / 1e6,
            load_metrics=routes_by_load,
        )
        self.load_share: TableLoadShare | LoadShare | None = None
        if self.process_count > 1 and routes_by_load:  # the others' routed requests count too
            blocks_of = self.router.own_blocks if isinstance(self.router, KvRouter) else None
            nats_url = config.services.nats.endpoint
            self.load_share = process_load_share(
                os.environ, self.process_index, self.process_count, self.tracker, blocks_of,
                lambda: LoadShare(nats_url, config.name, self.tracker, blocks_of),
            )  # fmt: skip
            if isinstance(self.load_share, TableLoadShare) and isinstance(self.router, KvRouter):
                # the least recently routed worker: across the processes, not in each one
                self.router.share_turns(SharedTurns(self.load_share.table), SharedTurns.stamp)
                # their pending prefill and in-flight prompts too, not only their counts
                self.router.share_routing(SharedRouting(self.load_share.table))
        self.started = int(time.time())
        self._worker_joined = asyncio.Event()
        # the routable workers and their shortest context, kept until the directory changes
        # (three reads per request otherwise, each a scan of every card)
        self._routable: list[WorkerCard] | None = None
        self._context_limit: int | None = None
        self._unsupported: frozenset[str] = frozenset()  # params some routable worker lacks

    async def start(self) -> None:
        await self.client.start()
        if self.media_intake is not None:
            self._media_subscription = await serve_media(
                self.client.nats, self.media_subject, self.media_store.lookup
            )
        if self.load_share is not None:
            await self.load_share.start()
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
        await self.response_store.close()
        if self.kv_feed is not None:
            await self.kv_feed.stop()
        if self.load_share is not None:
            await self.load_share.stop()
        if self.media_intake is not None:
            await self.media_intake.close()
        await self.client.stop()
        if isinstance(self.rotation, SharedRotation):  # the file stays for the others
            self.rotation.close()

    def _on_workers_changed(self, workers: dict[str, WorkerCard]) -> None:
        self._routable = None
        if workers:
            self._worker_joined.set()
        else:
            self._worker_joined.clear()

    def context_limit(self) -> int | None:
        """The context length every routable worker takes (None: no worker yet)."""
        self.candidates(set())  # fills the cache the directory's changes clear
        return self._context_limit

    @property
    def serving_roles(self) -> tuple[str, ...]:
        """agg, plus the disaggregation strategy's entry role (decode or prefill)."""
        return serving_roles(self.config.disaggregation.strategy)

    def candidates(self, exclude: set[str]) -> list[WorkerCard]:
        """Routable workers of the serving roles; `exclude` holds worker instances. The
        list may be shared between calls: read it, do not change it."""
        routable = self._routable
        if routable is None:
            roles = self.serving_roles
            routable = [
                card
                for card in self.directory.workers.values()
                if card.role in roles and not card.draining
            ]
            self._routable = routable
            self._context_limit = min((c.max_model_len for c in routable), default=None)
            self._unsupported = frozenset(n for c in routable for n in c.unsupported_params)
        if exclude:
            return [card for card in routable if card.instance not in exclude]
        return routable

    def constrains_after_thinking(self) -> bool:
        """Whether the routable workers can leave a reasoning model's thinking free before
        a constrained answer (`GuidedDecoding.thinking`; TensorRT-LLM constrains the whole
        output)."""
        self.candidates(set())  # (refreshes what the routable workers lack)
        return "guided_thinking" not in self._unsupported

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

    async def pick_worker(
        self,
        request: GenerateRequest,
        exclude: set[str],
        asked_as: Mapping[str, str] | None = None,
    ) -> WorkerCard:
        """A worker from the directory; waits up to no_worker_timeout_s, then 503.
        `asked_as`: the request param that set a sampling field (for the 400 of
        `able_workers`), where not the usual one."""
        candidates = self.candidates(exclude)
        if not candidates:
            candidates = await self.await_candidates(exclude)
        if request.pooling is not None:
            candidates = embedding_workers(candidates)
        candidates = able_workers(candidates, request, self._unsupported, asked_as)
        if request.media:
            candidates = media_workers(candidates, {m.kind for m in request.media})
        card = self.router.choose(candidates, request)
        self.check_disaggregated_peer(card)
        return card

    async def await_candidates(self, exclude: set[str]) -> list[WorkerCard]:
        """The routable workers (`candidates`), waiting up to no_worker_timeout_s for one to
        join; 503 when none did."""
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
        return candidates


# computed once: pydantic's get_default(call_default_factory=True) inspects the factory's
# signature on every call (~0.3 ms a request on the hot path)
_SAMPLING_DEFAULTS = {
    name: field.get_default(call_default_factory=True)
    for name, field in SamplingParams.model_fields.items()
}


def able_workers(
    candidates: list[WorkerCard],
    request: GenerateRequest,
    unsupported: Collection[str],
    asked_as: Mapping[str, str] | None = None,
) -> list[WorkerCard]:
    """The candidates whose engine honours every sampling field `request` sets (away from
    its default); 400 naming the field when none does (an engine declares what it cannot
    do in its card: the mocker has no logprobs). `unsupported`: the params some candidate
    lacks, or a superset of them (the routable workers', kept with them)."""
    if not unsupported:
        return candidates
    sampling = request.sampling
    used = {  # only the fields some candidate cannot do matter
        name
        for name in unsupported
        if name in _SAMPLING_DEFAULTS and getattr(sampling, name) != _SAMPLING_DEFAULTS[name]
    }
    if not used:
        return candidates
    able = [card for card in candidates if not used & set(card.unsupported_params)]
    if able:
        return able
    lacking = used & set(candidates[0].unsupported_params)
    field = "prompt_logprobs" if "prompt_logprobs" in lacking else sorted(lacking)[0]
    name = (asked_as or {}).get(field) or _REQUEST_PARAM.get(field, field)
    engine = candidates[0].engine or "this"
    what = _WHAT.get(field, "this parameter")
    raise errors.bad_request(
        f"{name}: the {engine} engine serving model {candidates[0].model!r} does not "
        f"support {what}",
        param=name,
    )


# A sampling field the request asks for under another name (echo + logprobs asks for the
# prompt's logprobs: the error names `echo`, and it is named first: the more specific).
_REQUEST_PARAM = {"prompt_logprobs": "echo", "guided": "response_format"}
_WHAT = {
    "prompt_logprobs": "echo with logprobs (the prompt's logprobs; a disaggregated "
    "deployment's prefill and decode workers do not carry them)",
    "guided": "constrained output (response_format json_object / json_schema, guided_json, "
    'guided_regex, guided_choice; tool_choice "required" or a named function)',
}


def check_task(state: FrontendState, task: str, endpoint: str) -> None:
    """400 (param `model`) when the deployment does not serve `task` (model.task): one task
    per deployment, as vLLM runs one runner per model."""
    served = state.config.model.task
    if served != task:
        raise errors.bad_request(
            f"model: {state.served_name!r} is deployed with model.task: {served}; {endpoint} "
            f"needs a deployment with model.task: {task}",
            param="model",
        )


def embedding_workers(candidates: list[WorkerCard]) -> list[WorkerCard]:
    """The candidates whose engine makes embeddings (its card's `tasks`); 400 (param
    `model`) when none does."""
    able = [card for card in candidates if "embed" in card.tasks]
    if able:
        return able
    engine = candidates[0].engine or "this"
    raise errors.bad_request(
        f"model: the {engine} engine serving model {candidates[0].model!r} makes no "
        "embeddings (its workers serve generation only)",
        param="model",
    )


def media_workers(candidates: list[WorkerCard], kinds: set[str]) -> list[WorkerCard]:
    """The candidates whose engine takes every media kind in `kinds` (its card's `media`);
    400 (param `messages`) when none does."""
    able = [card for card in candidates if kinds <= set(card.media)]
    if able:
        return able
    what = "images" if kinds == {"image"} else "precomputed image embeddings"
    if "image" in kinds and "embeds" in kinds:
        what = "images and precomputed image embeddings"
    engine = candidates[0].engine or "this"
    raise errors.bad_request(
        f"messages: model {candidates[0].model!r} (the {engine} engine) takes no {what}",
        param="messages",
    )

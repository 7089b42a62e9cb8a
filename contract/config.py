"""The one typed schema of a deployment, loaded from YAML and overridable from CLI and env.

Precedence: YAML file < environment (`HPCSERVE__FRONTEND__PORT=8001`) < `--set frontend.port=8001`.
Every error names the dotted field it is about.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contract.disagg import Strategy, default_strategy, strategy_from_env
from contract.messages import PoolingType
from contract.slurm_config import SlurmConfig

ENV_PREFIX = "HPCSERVE__"

Role = Literal["agg", "prefill", "decode"]
RouterMode = Literal["round_robin", "random", "least_loaded", "kv"]
# how generated text holds tool calls (frontend.tool_calls: one parser per format)
ToolCallParser = Literal["hermes", "llama3_json", "mistral", "pythonic"]
# how a reasoning model marks its thinking (frontend.reasoning: one tag pair per format)
ReasoningParser = Literal["deepseek_r1", "qwen3", "mistral"]
# The routers that read load (in-flight counts, the workers' LoadMetrics): only their frontend
# processes share counts with each other and parse the load reports; round robin shares only
# its rotation (`frontend.rotation`), random nothing.
LOAD_READING_ROUTERS: frozenset[str] = frozenset({"least_loaded", "kv"})


class ConfigError(ValueError):
    """A deployment config that cannot be used; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where prepared models and run folders live; `HPCSERVE_CACHE` moves it."""
    return Path(os.environ.get("HPCSERVE_CACHE", Path.home() / ".cache" / "hpcserve"))


def default_model_dir() -> Path:
    """The prepared default model (`hpcserve model prepare` writes it)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


PreparedModel = Literal["smollm2", "tiny-vlm", "tiny-vlm-siglip"]


def prepared_model_dir(prepared: PreparedModel) -> Path:
    """Where `hpcserve model prepare` puts each model it can build (no hub download)."""
    if prepared == "smollm2":
        return default_model_dir()
    tower = "siglip" if prepared == "tiny-vlm-siglip" else "clip"
    return cache_dir() / "models" / f"tiny-random-llava-{tower}"


# What a deployment serves: generation (/v1/chat/completions, /v1/completions) or embeddings
# (/v1/embeddings); vLLM's `--runner generate` / `--runner pooling --convert embed`.
Task = Literal["generate", "embed"]


class PoolerConfig(_Section):
    """`model.task: embed`: how a prompt's final-norm hidden states become its embedding."""

    pooling_type: PoolingType = Field(
        default="LAST",
        description="LAST: the last token's hidden state (decoder embedding models: "
        "e5-mistral, gte-Qwen2, Qwen3-Embedding); MEAN: the mean over the prompt's tokens",
    )
    normalize: bool = Field(default=True, description="scale each embedding to unit L2 norm")
    matryoshka_dimensions: list[int] | None = Field(
        default=None,
        description="the `dimensions` a client may ask for (Matryoshka truncation: the "
        "first d components, normalized after); null: the model was not trained for it and "
        "`dimensions` is refused (vLLM's rule)",
    )

    @model_validator(mode="after")
    def _positive_dimensions(self) -> PoolerConfig:
        if self.matryoshka_dimensions is not None and (
            not self.matryoshka_dimensions or min(self.matryoshka_dimensions) < 1
        ):
            raise ValueError("matryoshka_dimensions: a non-empty list of sizes >= 1, or null")
        return self


class ModelConfig(_Section):
    path: str | None = Field(
        default=None, description="HF model folder; empty means the prepared model `prepared`"
    )
    prepared: PreparedModel = Field(
        default="smollm2",
        description="with path empty: the model built on first use — the default SmolLM2, or "
        "a tiny RANDOM-weight vision-language model (tiny-vlm: CLIP tower; tiny-vlm-siglip)",
    )
    served_name: str | None = Field(
        default=None, description="name clients use in `model`; default: the folder name"
    )
    chat_template: str | None = Field(
        default=None,
        description="the chat template to use instead of the model's: a .jinja file, or the "
        "name of one shipped in frontend/templates (chatml_tools: ChatML that renders "
        "`tools` and tool calls in the Hermes/Qwen2.5 way)",
    )
    task: Task = Field(
        default="generate",
        description="generate: /v1/chat/completions, /v1/completions, /v1/responses; embed: "
        "/v1/embeddings (pooled hidden states, `pooler`). A deployment serves one task: the "
        "other's endpoints answer 400 naming this setting",
    )
    pooler: PoolerConfig = Field(default_factory=PoolerConfig)

    def resolved_path(self) -> Path:
        return Path(self.path).expanduser() if self.path else prepared_model_dir(self.prepared)

    def served_model_name(self) -> str:
        return self.served_name or self.resolved_path().name


class MockerConfig(_Section):
    """The simulated engine's timing model; times are divided by `speedup` (tests: large)."""

    prefill_ms_per_token: float = Field(default=0.05, ge=0)
    decode_ms_base: float = Field(default=5.0, ge=0)
    decode_ms_per_seq: float = Field(default=0.05, ge=0)
    decode_ms_per_ctx_token: float = Field(default=0.0005, ge=0)
    speedup: float = Field(default=1.0, gt=0)
    num_blocks: int = Field(default=8192, ge=1, description="KV pool; engine.num_blocks wins")


class TrtllmConfig(_Section):
    """`engine.kind: trtllm`: TensorRT-LLM's LLM API (PyTorch backend) on NVIDIA GPUs.

    Arguments go to `tensorrt_llm.LLM` in this order, each overriding the last: the fields
    below, then the YAML at `extra_engine_args` (TensorRT-LLM's own keys, as in
    `configs/engine_configs/`), then `override_engine_args` (deep-merged). A worker group's
    `tp` is `tensor_parallel_size`; its ranks are `tp * pipeline_parallel_size`.
    """

    model: str | None = Field(
        default=None, description="HF folder or TensorRT-LLM checkpoint; default: model.path"
    )
    tokenizer: str | None = Field(default=None, description="default: the model folder")
    extra_engine_args: str | None = Field(
        default=None, description="path to a TensorRT-LLM engine YAML (LLM API keys)"
    )
    override_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="LLM API keys deep-merged over everything else"
    )
    free_gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    max_batch_size: int | None = Field(default=None, ge=1)
    max_num_tokens: int | None = Field(default=None, ge=1)
    max_seq_len: int | None = Field(default=None, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    moe_expert_parallel_size: int | None = Field(default=None, ge=1)
    enable_attention_dp: bool = False
    gpus_per_node: int | None = Field(default=None, ge=1)
    enable_block_reuse: bool = Field(
        default=True, description="KV block reuse (prefix caching); the KV router needs it"
    )
    event_buffer_max_size: int = Field(
        default=100_000, ge=0, description="KV event buffer; 0 turns KV events off"
    )
    guided_decoding_backend: Literal["xgrammar", "llguidance"] | None = Field(
        default="xgrammar",
        description="TensorRT-LLM's grammar backend for constrained output (response_format "
        "json_object / json_schema); null: none, and such requests are refused with a 400",
    )
    launch: Literal["llmapi-launch", "spawn"] = Field(
        default="llmapi-launch",
        description="llmapi-launch: every rank started by mpirun/srun under "
        "trtllm-llmapi-launch; spawn: one process, the LLM spawns its ranks (one node, no Slurm)",
    )


class EngineConfig(_Section):
    kind: Literal["torch", "mocker", "trtllm"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    block_size: int = Field(default=16, ge=1, le=1024)
    num_blocks: int | None = Field(default=None, ge=1, description="overrides kv_cache_memory_mb")
    kv_cache_memory_mb: int | None = Field(
        default=None, ge=1,
        description="KV pool per rank; null: 512 on CPU, sized by gpu_memory_utilization on GPU",
    )  # fmt: skip
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1,
        description="GPU: the fraction of the GPU's memory for weights, KV cache and graphs",
    )  # fmt: skip
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=1024, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)
    mocker: MockerConfig = Field(default_factory=MockerConfig)
    trtllm: TrtllmConfig = Field(default_factory=TrtllmConfig)


# Where an engine built directly (tests, benchmarks) takes its defaults from: one definition.
ENGINE_DEFAULTS = EngineConfig()


class RestartPolicy(_Section):
    """How the supervisor answers a component's crash: start it again after a backoff that
    doubles each time (capped at a minute), at most `max_restarts` times in all."""

    max_restarts: int = Field(default=3, ge=0, description="0: never restart")
    backoff_s: float = Field(default=2.0, ge=0, description="wait before the first restart")


# `workers.N.per_process` left null: simulated workers share a process four at a time (one
# event loop and NATS connection for four engines: x0.55-0.58 CPU per request, measured on
# branch mockn; Dynamo's mocker hosts eight), and every other engine has a process each.
DEFAULT_MOCKER_PER_PROCESS = 4


class WorkerGroupConfig(_Section):
    role: Role = "agg"
    count: int = Field(default=1, ge=1)
    tp: int = Field(default=1, ge=1)
    per_process: int | None = Field(
        default=None, ge=1,
        description="workers of this group one process hosts (engine.kind mocker only): one "
        f"event loop and NATS connection for them, and a crash restarts them together; null: "
        f"{DEFAULT_MOCKER_PER_PROCESS} for the mocker, 1 for other engines",
    )  # fmt: skip
    engine_args: str | None = Field(
        default=None,
        description="TensorRT-LLM YAML for this group; overrides engine.trtllm.extra_engine_args",
    )
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    critical: bool = Field(
        default=True,
        description="a worker of this group out of restarts fails the deployment (false: "
        "the others serve on)",
    )


def workers_per_process(config: DeploymentConfig, group: WorkerGroupConfig) -> int:
    """How many workers of `group` one process hosts (the last process may host fewer):
    `per_process`, or its default for the engine, never more than `count`."""
    if group.per_process is not None:
        hosted = group.per_process
    else:
        hosted = DEFAULT_MOCKER_PER_PROCESS if config.engine.kind == "mocker" else 1
    return min(hosted, group.count)


def group_ranks(config: DeploymentConfig, group: WorkerGroupConfig) -> int:
    """MPI ranks of one worker of `group`: its TP degree, times the pipeline stages of a
    TensorRT-LLM engine."""
    if config.engine.kind == "trtllm":
        return group.tp * config.engine.trtllm.pipeline_parallel_size
    return group.tp


class KvRouterConfig(_Section):
    """KV-aware routing (Dynamo's cost model; lowest wins, see `frontend.kv_router`):

    prefill = own pending prefill blocks (less what the worker computed of them since,
              at its measured rate: prefill_progress)
              + uncached_weight x max(prompt blocks - overlap_credit x cached blocks, 0)
    cost    = prefill_load_scale x prefill + decode blocks (deduplicated) + new blocks

    Workers within tie_band (at no more prefill than the cheapest) take turns.
    """

    overlap_credit: float = Field(
        default=1.0, ge=0, le=1, description="credit per cached prefix block; 0 ignores caches"
    )
    uncached_weight: float = Field(
        default=2.0,
        ge=1,
        description="weight of the request's own uncached blocks in the prefill term: 1 is "
        "its own wait only (Dynamo); 2 adds the wait it imposes on the worker's next "
        "requests, so a hit behind one fresh prefill beats recomputing the prefix elsewhere",
    )
    prefill_load_scale: float = Field(
        default=4.0, ge=0, description="weight of the prefill term against the decode term"
    )
    overlap_score_weight: float | None = Field(
        default=None,
        ge=0,
        description="deprecated (the old cost model); when set, used as prefill_load_scale",
    )
    router_temperature: float = Field(
        default=0.0, ge=0, description="0: cheapest worker; > 0: softmax sampling over -cost"
    )
    tie_band: float = Field(
        default=4.0,
        ge=0,
        description="costs within tie_band x the request's own prompt blocks of the cheapest, "
        "at no more prefill work than it (see pending_tolerance) and, where its cache draws "
        "hits, at most one more running request, "
        "count as tied, and ties go to the least prefill ahead, then the worker whose cache "
        "drew the fewest recent hits, then the one routed to least recently: a difference "
        "of a few such requests' decode footprint says nothing about when its prefill "
        "starts (frontend.kv_router docstring)",
    )
    pending_tolerance: float = Field(
        default=0.25,
        ge=0,
        description="pending prefill estimates within pending_tolerance x the request's own "
        "prompt blocks of each other count as equal in the tie_band, where taking turns "
        "decides: through HTTP the estimate was off by ~0.2 s of prefill either way and "
        "sent requests behind later prefills than round robin did (0: exact)",
    )
    turns_without_hits: bool = Field(
        default=True,
        description="where no candidate caches any of the prompt and no worker's cache "
        "draws hits, take turns among the workers whose pending prefill and whose decode "
        "blocks are each within the tie band of the least (tie_band x the prompt's blocks "
        "of cost), a worker with nothing pending first (false: the tie_band rules on the "
        "summed cost decide; needs tie_band > 0)",
    )
    prefill_progress: bool = Field(
        default=True,
        description="count a worker's pending prefill as computed at its measured rate "
        "since it started on it (false: each prompt whole until its first output)",
    )
    block_size: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="deprecated: prompts are hashed at each worker's own block size (its "
        "card); if set, it must equal engine.block_size",
    )
    reconcile_interval_s: float = Field(
        default=30.0, gt=0, description="how often the KV index asks every worker for a snapshot"
    )
    approx_ttl_s: float = Field(
        default=120.0,
        gt=0,
        description="how long a routed prompt counts as cached for a worker that publishes "
        "no KV events (the approximate index)",
    )
    events_grace_s: float = Field(
        default=10.0,
        gt=0,
        description="a worker that finished requests but published no KV event for this long "
        "is warned about (once) and routed by the approximate index",
    )

    @property
    def load_scale(self) -> float:
        """prefill_load_scale, or the deprecated overlap_score_weight when that is set."""
        if self.overlap_score_weight is not None:
            return self.overlap_score_weight
        return self.prefill_load_scale


class FrontendConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    router: RouterMode = "round_robin"
    kv_router: KvRouterConfig = Field(default_factory=KvRouterConfig)
    request_timeout_s: float = Field(default=600.0, gt=0)
    no_worker_timeout_s: float = Field(
        default=0.0, ge=0, description="how long a request waits for a worker before 503"
    )
    # a request whose worker dies mid-stream continues on another one (prompt + tokens so far)
    migration_limit: int = Field(
        default=3, ge=0, description="re-sends per request after worker loss; 0: fail instead"
    )
    restart: RestartPolicy = Field(default_factory=RestartPolicy)  # always critical
    max_request_bytes: int = Field(
        default=16 * 2**20, ge=1024, description="larger request bodies get a 413, unread"
    )
    max_n: int = Field(
        default=16,
        ge=1,
        description="most choices (`n`) one completion request may ask for per prompt: they "
        "all go to one worker (they share the prompt's KV blocks)",
    )
    max_choices_per_request: int = Field(
        default=256,
        ge=1,
        description="most choices one request may ask for in all: prompts x n (a batch of "
        "prompts on /v1/completions; each prompt is routed on its own); at least max_n",
    )
    max_embedding_inputs: int = Field(
        default=2048,
        ge=1,
        description="most inputs one /v1/embeddings request may hold (OpenAI's limit); each "
        "input is routed on its own",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="frontend processes sharing the port (SO_REUSEPORT), each supervised; "
        "null: one per spare core of the head node (contract.plan.frontend_processes)",
    )
    busy_poll_us: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="keep each frontend process's event loop polling, not sleeping, for up "
        "to this long after sending a request or receiving a reply while requests wait: a "
        "process woken from an idle core costs ~0.1-0.3 ms per request at low load (see "
        "benchmarks/README.md), at the price of a busy core while requests are in flight; "
        "0: off (the right choice when cores are shared)",
    )

    responses_store_ttl_s: int = Field(
        default=3600,
        ge=1,
        description="how long a /v1/responses answer with `store: true` stays in etcd (for "
        "GET /v1/responses/{id} and previous_response_id), from its creation",
    )
    responses_store_max_bytes: int = Field(
        default=2**20,
        ge=1024,
        le=1_500_000,
        description="the largest stored response record (response + conversation, JSON), "
        "below etcd's 1.5 MiB request limit; a larger one is not stored and its answer says "
        "`store: false`",
    )
    max_background_responses: int = Field(
        default=256,
        ge=0,
        description="most /v1/responses with `background: true` one frontend process runs at "
        "once (each is a generation no HTTP connection holds, and a streamed one keeps its "
        "events for re-attaching clients); past it a 429 (rate_limit_exceeded); 0: background "
        "responses are refused",
    )
    background_owner_ttl_s: int = Field(
        default=10,
        ge=2,
        le=300,
        description="the lease of a frontend process's mark in etcd while it runs background "
        "responses: within this long of the process's death (a crash, a kill), a GET of one "
        "it was running says `failed` instead of `in_progress`",
    )

    tool_call_parser: ToolCallParser | None = Field(
        default=None,
        description="how the model writes tool calls (hermes, llama3_json, mistral, "
        "pythonic): chat requests may then carry `tools`, and calls in the output come back "
        "as `tool_calls`; null: requests with tools are refused. The chat template must "
        "render `tools` (model.chat_template)",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="a file of API keys, one a line (`#` comments; keep it readable by you "
        "alone): every /v1 request must then send `Authorization: Bearer <key>` (401 "
        "otherwise); the HPCSERVE_API_KEY environment variable (comma-separated) adds keys. "
        "Neither set: the endpoints are open",
    )
    reasoning_parser: ReasoningParser | None = Field(
        default=None,
        description="how a reasoning model marks its thinking (deepseek_r1, qwen3: "
        "<think>...</think>; mistral: [THINK]...[/THINK]): chat answers then carry the "
        "thinking apart as `reasoning_content` (and `reasoning`), the answer as `content`; "
        "null: the output is all content",
    )

    @model_validator(mode="after")
    def _n_within_the_choice_cap(self) -> FrontendConfig:
        if self.max_n > self.max_choices_per_request:
            raise ValueError(
                f"max_n: {self.max_n} is more than max_choices_per_request "
                f"({self.max_choices_per_request}), which caps every request's choices"
            )
        return self


class ServiceConfig(_Section):
    start: bool = True
    endpoint: str | None = Field(
        default=None, description="use this running service instead of starting one"
    )
    restart: RestartPolicy = Field(
        default_factory=lambda: RestartPolicy(backoff_s=0.5)
    )  # a started service is always critical

    @model_validator(mode="after")
    def _endpoint_when_not_started(self) -> ServiceConfig:
        if not self.start and not self.endpoint:
            raise ValueError("endpoint is required when start is false")
        return self


class ServicesConfig(_Section):
    etcd: ServiceConfig = Field(default_factory=ServiceConfig)
    nats: ServiceConfig = Field(default_factory=ServiceConfig)
    lease_ttl_s: int = Field(default=10, ge=2)


class DisaggregationConfig(_Section):
    """Prefill/decode split: used when workers have roles `prefill` and `decode`."""

    strategy: Strategy | None = Field(
        default=None,
        description="null: prefill_first with frontend.router kv, else decode_first; "
        "env DISAGGREGATION_STRATEGY overrides",
    )
    kv_transfer: Literal["ucx", "nixl", "tcp"] = Field(
        default="ucx", description="KV transport: ucx (ucxx), nixl, or tcp (plain sockets)"
    )
    fallback_local_prefill: bool = Field(
        default=False, description="decode workers prefill locally when no prefill worker is up"
    )
    transfer_timeout_s: float = Field(
        default=60.0, gt=0, description="one remote prefill + KV transfer, before a retry"
    )


class LengthDistribution(_Section):
    """Token lengths drawn from a normal distribution (aiperf's synthetic prompts)."""

    mean: int = Field(ge=1)
    stddev: float = Field(default=0.0, ge=0)


class SharedPrefixConfig(_Section):
    """A workload whose requests share prefixes, for router comparisons (a KV-aware router
    sends a repeated prefix to the worker that holds it). At most one of the two prefix kinds;
    `turns > 1` makes every session a conversation whose turns resend the history."""

    system_prompt_tokens: int = Field(
        default=0, ge=0, description="one system prompt of this length shared by every request"
    )
    prefix_prompts: int = Field(
        default=0, ge=0, description="a pool of this many prefixes, one picked per request"
    )
    prefix_tokens: int = Field(default=0, ge=0, description="length of each pooled prefix")
    turns: int = Field(default=1, ge=1, description="turns per conversation (multi-turn)")

    @model_validator(mode="after")
    def _one_prefix_kind(self) -> SharedPrefixConfig:
        if self.system_prompt_tokens and (self.prefix_prompts or self.prefix_tokens):
            raise ValueError(
                "prefix_prompts: a shared system prompt and a prefix pool exclude each other"
            )
        if bool(self.prefix_prompts) != bool(self.prefix_tokens):
            raise ValueError("prefix_tokens: prefix_prompts and prefix_tokens go together")
        return self


class BenchmarkConfig(_Section):
    """A load sweep (`hpcserve bench`, or a Slurm job's step after READY): aiperf at each
    concurrency in turn, the same synthetic workload at every point."""

    concurrency: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 4, 8], min_length=1,
        description="concurrent requests of each point, in sweep order",
    )  # fmt: skip
    requests: int | None = Field(
        default=None, ge=1,
        description="requests per point; null (and no duration_s): max(16, 4 * concurrency)",
    )  # fmt: skip
    duration_s: float | None = Field(
        default=None, gt=0, description="seconds per point instead of a request count"
    )
    input_tokens: LengthDistribution = Field(default_factory=lambda: LengthDistribution(mean=128))
    output_tokens: LengthDistribution = Field(default_factory=lambda: LengthDistribution(mean=64))
    ignore_eos: bool = Field(
        default=True, description="generate exactly the drawn output length (no early EOS)"
    )
    streaming: bool = Field(default=True, description="SSE streaming (TTFT and ITL need it)")
    endpoint: Literal["chat", "completions", "embeddings", "responses"] = Field(
        default="chat",
        description="chat, completions, embeddings (model.task: embed) or responses "
        "(the Responses API)",
    )
    shared_prefix: SharedPrefixConfig | None = None
    seed: int = Field(default=0, ge=0, description="aiperf's --random-seed: the same prompts")
    warmup_requests: int = Field(default=0, ge=0, description="unmeasured requests per point")
    request_timeout_s: float = Field(default=600.0, gt=0)
    gpus: int | None = Field(
        default=None, ge=1,
        description="divides output tok/s into tok/s/GPU; null: the deployment's worker ranks",
    )  # fmt: skip
    label: str | None = Field(
        default=None, description="the run's name in tables and plots; default: the config name"
    )
    then: Literal["exit", "serve"] = Field(
        default="serve",
        description="in a Slurm job, after the sweep: exit (end the job) or serve on",
    )

    @model_validator(mode="after")
    def _count_or_duration(self) -> BenchmarkConfig:
        if self.requests is not None and self.duration_s is not None:
            raise ValueError("duration_s: give requests or duration_s, not both")
        prefix = self.shared_prefix
        if self.endpoint == "embeddings" and prefix is not None:
            if prefix.turns > 1:
                raise ValueError("shared_prefix.turns: embeddings have no conversation (one turn)")
            if prefix.system_prompt_tokens:  # aiperf's embeddings payload has no system prompt
                raise ValueError(
                    "shared_prefix.system_prompt_tokens: an embeddings request has no system "
                    "prompt; share prefixes with prefix_prompts and prefix_tokens"
                )
        return self

    def requests_at(self, concurrency: int) -> int | None:
        """Requests asked for at one point; None when the point runs for `duration_s`."""
        if self.duration_s is not None:
            return None
        return self.requests if self.requests is not None else max(16, 4 * concurrency)


class MultimodalConfig(_Section):
    """Images in chat messages (`image_url` parts) for a vision-language model: where they
    may come from and how big they may be."""

    allow_remote: bool = Field(
        default=False, description="fetch http(s):// image URLs (else refused with a 400)"
    )
    allowed_local_media_path: str | None = Field(
        default=None,
        description="local files (file:// or a path) only under this folder; default: none",
    )
    max_media_bytes: int = Field(
        default=50 * 2**20, ge=1024, description="largest image or embedding file, in bytes"
    )
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, description="largest decoded image (width × height)"
    )
    max_images_per_request: int = Field(default=8, ge=1)
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="http(s) image download")
    store_max_bytes: int = Field(
        default=2 * 2**30,
        ge=1024,
        description="the payloads of in-flight requests one frontend process holds for the "
        "workers, in bytes; past it new image requests get a 503",
    )

    @model_validator(mode="after")
    def _store_holds_one(self) -> MultimodalConfig:
        if self.store_max_bytes < self.max_media_bytes:
            raise ValueError(
                "store_max_bytes: must be at least max_media_bytes (one image must fit)"
            )
        return self


class DeploymentConfig(_Section):
    name: str = Field(default="hpcserve", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    workers: list[WorkerGroupConfig] = Field(
        default_factory=lambda: [WorkerGroupConfig()], min_length=1
    )
    frontend: FrontendConfig = Field(default_factory=FrontendConfig)
    disaggregation: DisaggregationConfig = Field(default_factory=DisaggregationConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    multimodal: MultimodalConfig = Field(default_factory=MultimodalConfig)
    run_dir: str | None = Field(
        default=None,
        description="logs, pids and service data; default: ~/.cache/hpcserve/runs/NAME-TIME",
    )
    slurm: SlurmConfig | None = Field(
        default=None, description="Slurm job options; used by `hpcserve render/submit`, not by `up`"
    )
    benchmark: BenchmarkConfig | None = Field(
        default=None,
        description="a load sweep: `hpcserve bench` defaults; in a Slurm job a step after READY",
    )

    @model_validator(mode="after")
    def _only_agg_for_now(self) -> DeploymentConfig:
        _check_disaggregation(self)
        if self.model.task == "embed":
            if self.engine.kind == "trtllm":
                raise ValueError(
                    "model.task: embed needs engine.kind torch (or mocker, simulated): "
                    "TensorRT-LLM's LLM API generates; it documents no pooled hidden states"
                )
            where = next((i for i, g in enumerate(self.workers) if g.role != "agg"), None)
            if where is not None:
                raise ValueError(
                    f"workers.{where}.role: model.task embed runs each prompt once, on one "
                    "worker: only agg workers (prefill/decode split generation)"
                )
        routed_size = self.frontend.kv_router.block_size
        if routed_size is not None and routed_size != self.engine.block_size:
            raise ValueError(
                f"frontend.kv_router.block_size: {routed_size} differs from engine.block_size "
                f"{self.engine.block_size}; the router hashes prompts at each worker's own "
                "block size (drop the setting)"
            )
        for index, group in enumerate(self.workers):
            if group.tp > 1 and self.engine.kind == "mocker":
                raise ValueError(
                    f"workers.{index}.tp: tensor parallelism needs engine.kind torch or trtllm"
                )
            if (group.per_process or 1) > 1 and self.engine.kind != "mocker":
                raise ValueError(
                    f"workers.{index}.per_process: several workers in one process need "
                    f"engine.kind mocker (a {self.engine.kind} worker holds a device and "
                    "its own process); drop it or set 1"
                )
        return self


def _check_disaggregation(config: DeploymentConfig) -> None:
    """Roles prefill/decode come together (or decode alone with local-prefill fallback);
    fills in the strategy's default (the seed's: prefill_first with the kv router).
    Their TP degrees may differ: KV travels with every global head and each group's leader
    maps it to its ranks' heads (whether a degree splits the model's heads is checked
    against the model at launch, naming `workers.N.tp`)."""
    disagg = config.disaggregation
    if disagg.strategy is None:
        disagg.strategy = default_strategy(config.frontend.router)
    roles = {group.role for group in config.workers}
    if not roles & {"prefill", "decode"}:
        return
    where = next(i for i, g in enumerate(config.workers) if g.role in ("prefill", "decode"))
    if config.engine.kind == "mocker":
        raise ValueError(
            f"workers.{where}.role: prefill/decode roles need engine.kind torch or trtllm "
            "(the KV cache moves between them)"
        )
    if "decode" not in roles:
        raise ValueError(f"workers.{where}.role: prefill workers need a decode worker group")
    if "prefill" not in roles and not disagg.fallback_local_prefill:
        raise ValueError(
            f"workers.{where}.role: decode workers need a prefill worker group "
            "(or disaggregation.fallback_local_prefill: true)"
        )
    if "prefill" not in roles and disagg.strategy == "prefill_first":
        raise ValueError("disaggregation.strategy: prefill_first needs a prefill worker group")


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> DeploymentConfig:
    """Read YAML (or defaults), apply env then `key.path=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
        _anchor_engine_yaml(data, Path(path).parent)
    environ = os.environ if environ is None else environ
    for key, value in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(data, dotted, _parse_value(value))
    strategy = strategy_from_env(environ)  # the seed's switch; --set still wins
    if strategy is not None:
        _set_dotted(data, "disaggregation.strategy", strategy)
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"override {item!r} must look like field.path=value")
        _set_dotted(data, dotted.strip(), _parse_value(value))
    try:
        return DeploymentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def engine_yaml_fields(data: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """Every place a raw config dict names a TensorRT-LLM engine YAML, as (holder, key,
    label): `engine.trtllm.extra_engine_args` and each `workers.N.engine_args`. The one
    list the loader (anchoring relative paths) and the job set-up (copying the files) share."""
    engine = data.get("engine")
    trtllm = engine.get("trtllm") if isinstance(engine, dict) else None
    fields = [(trtllm, "extra_engine_args", "engine")] if isinstance(trtllm, dict) else []
    workers = data.get("workers")
    if isinstance(workers, list):
        fields += [
            (group, "engine_args", f"group{index}")
            for index, group in enumerate(workers)
            if isinstance(group, dict)
        ]
    return fields


def _anchor_engine_yaml(data: dict[str, Any], config_dir: Path) -> None:
    """A relative engine YAML path in a config file names a file beside it (as the seed's
    `engine_configs/` do); made absolute so resolved copies keep pointing there. The same
    for the API key file."""
    fields = engine_yaml_fields(data)
    if isinstance(data.get("frontend"), dict):
        fields.append((data["frontend"], "api_key_file", "frontend"))
    for holder, key, _ in fields:
        value = holder.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            holder[key] = str((config_dir / value).resolve())


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[: depth + 1])}: no such list item")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[:depth])}: is a value, it has no field {part!r}")
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = [{}] if part == "workers" else {}
                node[part] = child
            node = child


_FIELD_PREFIX = re.compile(r"^[A-Za-z_][\w.]*: ")


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        names_field = _FIELD_PREFIX.match(message) is not None
        if message.startswith(f"{field}:") or (names_field and not error["loc"]):
            lines.append(message)
        elif names_field:  # a section's validator naming one of its fields
            lines.append(f"{field}.{message}")
        else:
            lines.append(f"{field}: {message}")
    return "invalid config: " + "; ".join(lines)

"""TEST DOUBLE of `tensorrt_llm.llmapi.llm_args`: the LLM's pydantic argument models.

Like the real module, every config is a pydantic model with `extra="forbid"` (an unknown key,
nested or not, is a ValidationError, which is a ValueError naming the key), and the YAML
merge helper `update_llm_args_with_extra_dict` behaves as the real one: kv_cache_config dicts
are merged over the existing config, nested config dicts become config objects, and the
result is `llm_args | overrides`. Fields that only matter on a GPU are accepted and ignored.
"""

from __future__ import annotations

import logging
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    field_validator,
    model_validator,
)

logger = logging.getLogger("tensorrt_llm")


class StrictBaseModel(BaseModel):
    """Base of every config: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class CapacitySchedulerPolicy(StrEnum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class ContextChunkingPolicy(StrEnum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"


class BatchingType(StrEnum):
    STATIC = "STATIC"
    INFLIGHT = "INFLIGHT"


class LoadFormat(Enum):
    AUTO = 0
    DUMMY = 1
    VISION_ONLY = 2


class DynamicBatchConfig(StrictBaseModel):
    enable_batch_size_tuning: bool = True
    enable_max_num_tokens_tuning: bool = False
    dynamic_batch_moving_average_window: int = 128


class SchedulerConfig(StrictBaseModel):
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: ContextChunkingPolicy | None = None
    dynamic_batch_config: DynamicBatchConfig | None = None


_KV_DTYPES = {"auto", "fp8", "nvfp4", "float16", "half", "bfloat16", "float32", "float"}


class KvCacheConfig(StrictBaseModel):
    """KV cache configuration (the double uses max_tokens, tokens_per_block, reuse, events)."""

    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = Field(default=0.9, ge=0, le=1)
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: float | None = None
    secondary_offload_min_priority: int | None = None
    event_buffer_max_size: int = 0
    attention_dp_events_gather_period_ms: int = 5
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    max_gpu_total_bytes: NonNegativeInt = 0
    dtype: str = "auto"
    mamba_ssm_cache_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    tokens_per_block: int = 32
    use_kv_cache_manager_v2: bool = False
    kv_events_config: dict[str, Any] | None = None

    @field_validator("dtype")
    @classmethod
    def _validate_dtype(cls, value: str) -> str:
        value = value.lower()
        if value not in _KV_DTYPES:
            raise ValueError(
                'kv_cache_config.dtype must be one of "auto", "fp8", "nvfp4", or valid '
                "torch.dtype string"
            )
        return value

    @field_validator("tokens_per_block")
    @classmethod
    def _validate_tokens_per_block(cls, value: int) -> int:
        if value < 1:
            raise ValueError("kv_cache_config.tokens_per_block must be positive")
        return value


class CacheTransceiverConfig(StrictBaseModel):
    """KV transfer between context and generation engines (disaggregated serving)."""

    backend: Literal["DEFAULT", "UCX", "NIXL", "MOONCAKE", "MPI"] | None = None
    transceiver_runtime: Literal["CPP", "PYTHON"] | None = None
    max_tokens_in_buffer: int | None = None
    kv_transfer_timeout_ms: PositiveInt | None = None
    kv_transfer_sender_future_timeout_ms: PositiveInt | None = 1000


class CudaGraphConfig(StrictBaseModel):
    """CUDA graph settings (no effect in the double)."""

    batch_sizes: list[int] | None = None
    max_batch_size: NonNegativeInt = 0
    enable_padding: bool = False

    @model_validator(mode="after")
    def _derive_sizes(self) -> CudaGraphConfig:
        if self.batch_sizes:
            self.batch_sizes = sorted(self.batch_sizes)
            derived = max(self.batch_sizes)
            if self.max_batch_size == 0:
                self.max_batch_size = derived
            elif self.max_batch_size != derived:
                raise ValueError(
                    "CudaGraphConfig.max_batch_size is incompatible with "
                    "CudaGraphConfig.batch_sizes: max_batch_size must equal max(batch_sizes)"
                )
        else:
            self.max_batch_size = self.max_batch_size or 128
            sizes = [*range(1, 32), 32, 64, 128]
            self.batch_sizes = sorted(
                {s for s in sizes if s <= self.max_batch_size} | {self.max_batch_size}
            )
        return self


class DecodingBaseConfig(StrictBaseModel):
    """Speculative decoding base (no effect on the double's tokens: speculation is exact)."""

    max_draft_len: NonNegativeInt | None = None
    max_total_draft_tokens: int | None = None
    speculative_model: str | Path | None = Field(
        default=None,
        validation_alias=AliasChoices("speculative_model", "speculative_model_dir"),
    )
    max_concurrency: PositiveInt | None = None
    load_format: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodingBaseConfig:
        """Pick the config class by `decoding_type` (the discriminator), as the real one."""
        data = dict(data)
        decoding_type = data.get("decoding_type")
        config_class = _DECODING_TYPES.get(str(decoding_type))
        if config_class is None:
            raise ValueError(f"Invalid decoding type: {decoding_type}")
        return config_class(**data)


class EagleDecodingConfig(DecodingBaseConfig):
    decoding_type: Literal["Eagle"] = "Eagle"
    eagle_choices: list[list[int]] | None = None
    greedy_sampling: bool | None = True
    posterior_threshold: float | None = None
    use_dynamic_tree: bool | None = False
    dynamic_tree_max_topK: int | None = None
    num_eagle_layers: int | None = None
    max_non_leaves_per_layer: int | None = None
    eagle3_one_model: bool | None = True
    eagle3_layers_to_capture: set[int] | None = None

    @model_validator(mode="after")
    def _validate_eagle(self) -> EagleDecodingConfig:
        if self.max_draft_len is None or self.max_draft_len == 0:
            raise ValueError("max_draft_len must be > 0 for Eagle")
        if self.speculative_model is None:
            raise ValueError("Draft model must be provided for EAGLE")
        self.num_eagle_layers = self.max_draft_len
        if self.max_total_draft_tokens is None:
            self.max_total_draft_tokens = self.max_draft_len
        return self


class Eagle3DecodingConfig(EagleDecodingConfig):
    decoding_type: Literal["Eagle3"] = "Eagle3"  # type: ignore[assignment]


class MTPDecodingConfig(DecodingBaseConfig):
    decoding_type: Literal["MTP"] = "MTP"
    num_nextn_predict_layers: int = 1
    use_relaxed_acceptance_for_thinking: bool = False
    relaxed_topk: int = 1
    relaxed_delta: float = 0.0
    use_mtp_vanilla: bool = False
    mtp_eagle_one_model: bool = True

    @model_validator(mode="after")
    def _validate_mtp(self) -> MTPDecodingConfig:
        if self.max_draft_len is None:
            self.max_draft_len = self.num_nextn_predict_layers
        self.max_total_draft_tokens = self.max_draft_len
        return self


class NGramDecodingConfig(DecodingBaseConfig):
    decoding_type: Literal["NGram"] = "NGram"
    max_matching_ngram_size: PositiveInt = 2
    is_keep_all: bool = True
    is_use_oldest: bool = True
    is_public_pool: bool = True

    @model_validator(mode="after")
    def _validate_ngram(self) -> NGramDecodingConfig:
        if self.max_draft_len is None or self.max_draft_len <= 0:
            raise ValueError("max_draft_len must be > 0 for NGram")
        self.max_total_draft_tokens = self.max_draft_len
        return self


class DraftTargetDecodingConfig(DecodingBaseConfig):
    decoding_type: Literal["Draft_Target"] = "Draft_Target"

    @model_validator(mode="after")
    def _validate_draft_target(self) -> DraftTargetDecodingConfig:
        if self.max_draft_len is None or self.max_draft_len <= 0:
            raise ValueError("max_draft_len must be > 0 for DraftTarget")
        if self.speculative_model is None:
            raise ValueError("speculative_model must be specified for DraftTarget")
        self.max_total_draft_tokens = self.max_draft_len
        return self


_DECODING_TYPES: dict[str, type[DecodingBaseConfig]] = {
    "Eagle": EagleDecodingConfig,
    "Eagle3": Eagle3DecodingConfig,
    "MTP": MTPDecodingConfig,
    "NGram": NGramDecodingConfig,
    "Draft_Target": DraftTargetDecodingConfig,
}

SpeculativeConfig = Annotated[
    DraftTargetDecodingConfig
    | Eagle3DecodingConfig
    | EagleDecodingConfig
    | MTPDecodingConfig
    | NGramDecodingConfig,
    Field(discriminator="decoding_type"),
]


class KvCacheConnectorConfig(StrictBaseModel):
    connector_module: str
    connector_scheduler_class: str
    connector_worker_class: str


class AttentionDpConfig(StrictBaseModel):
    enable_balance: bool = False
    timeout_iters: int = 50
    batching_wait_iters: int = 10


class TorchCompileConfig(StrictBaseModel):
    enable_fullgraph: bool = True
    enable_inductor: bool = False
    enable_piecewise_cuda_graph: bool = False
    capture_num_tokens: list[int] | None = None
    enable_userbuffers: bool = True
    max_num_streams: PositiveInt = 1


class BuildConfig(StrictBaseModel):
    """Minimal: the TensorRT-engine build settings (unused on the PyTorch backend)."""

    max_batch_size: int = 2048
    max_num_tokens: int = 8192
    max_seq_len: int | None = None
    max_beam_width: int = 1
    max_input_len: int = 1024
    gather_context_logits: bool = False


_ALLREDUCE = Literal[
    "AUTO",
    "NCCL",
    "UB",
    "MINLATENCY",
    "ONESHOT",
    "TWOSHOT",
    "LOWPRECISION",
    "MNNVL",
    "NCCL_SYMMETRIC",
]


class TorchLlmArgs(StrictBaseModel):
    """Arguments of the PyTorch-backend LLM (the field set `LLM(**kwargs)` is checked against)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    # explicit LLM(...) parameters
    model: str | Path
    tokenizer: Any = None
    tokenizer_mode: Literal["auto", "slow"] = "auto"
    custom_tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    revision: str | None = None
    tokenizer_revision: str | None = None
    # BaseLlmArgs
    model_kwargs: dict[str, Any] | None = None
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    gpus_per_node: int | None = None
    moe_cluster_parallel_size: int | None = None
    moe_tensor_parallel_size: int | None = None
    moe_expert_parallel_size: int | None = None
    enable_attention_dp: bool = False
    enable_lm_head_tp_in_adp: bool = False
    pp_partition: list[int] | None = None
    cp_config: dict[str, Any] | None = None
    enable_lora: bool = False
    lora_config: Any = None
    kv_cache_config: KvCacheConfig = Field(default_factory=KvCacheConfig)
    enable_chunked_prefill: bool = False
    guided_decoding_backend: Literal["xgrammar", "llguidance"] | None = None
    batched_logits_processor: Any = None
    iter_stats_max_iterations: int | None = Field(default=None, ge=-1)
    request_stats_max_iterations: int | None = Field(default=None, ge=-1)
    peft_cache_config: Any = None
    scheduler_config: SchedulerConfig = Field(default_factory=SchedulerConfig)
    cache_transceiver_config: CacheTransceiverConfig | None = None
    sparse_attention_config: Any = None
    speculative_config: SpeculativeConfig | None = None
    max_batch_size: int | None = 2048
    max_input_len: int | None = 1024
    max_seq_len: int | None = None
    max_beam_width: int | None = 1
    max_num_tokens: int | None = 8192
    gather_generation_logits: bool = False
    num_postprocess_workers: int = 0
    postprocess_tokenizer_dir: str | None = None
    reasoning_parser: str | None = None
    decoding_config: Any = None
    mpi_session: Any = Field(default=None, alias="_mpi_session", exclude=True)
    otlp_traces_endpoint: str | None = None
    backend: Literal["pytorch"] = "pytorch"
    return_perf_metrics: bool = False
    orchestrator_type: Literal["rpc", "ray"] | None = None
    env_overrides: dict[str, str] | None = None
    # TorchLlmArgs
    garbage_collection_gen0_threshold: int = 20000
    cuda_graph_config: CudaGraphConfig | None = Field(default_factory=CudaGraphConfig)
    attention_dp_config: AttentionDpConfig | None = None
    disable_overlap_scheduler: bool = False
    moe_config: Any = None
    attn_backend: str = "TRTLLM"
    sampler_type: str = "auto"
    enable_iter_perf_stats: bool = False
    enable_iter_req_stats: bool = False
    print_iter_log: bool = False
    batch_wait_timeout_ms: float = Field(default=0, ge=0)
    batch_wait_timeout_iters: NonNegativeInt = 0
    batch_wait_max_tokens_ratio: float = Field(default=0, ge=0, le=1)
    torch_compile_config: TorchCompileConfig | None = None
    enable_autotuner: bool = True
    enable_layerwise_nvtx_marker: bool = False
    load_format: str | LoadFormat = LoadFormat.AUTO
    enable_min_latency: bool = False
    stream_interval: PositiveInt = 1
    force_dynamic_quantization: bool = False
    allreduce_strategy: _ALLREDUCE | None = "AUTO"
    checkpoint_loader: Any = None
    checkpoint_format: str | None = None
    kv_connector_config: KvCacheConnectorConfig | None = None
    mm_encoder_only: bool = False
    ray_worker_extension_cls: str | None = None
    sleep_config: Any = None
    max_stats_len: int = Field(default=1000, ge=-1)
    perf_metrics_max_requests: NonNegativeInt = 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TorchLlmArgs:
        return cls(**kwargs)

    @field_validator("load_format", mode="before")
    @classmethod
    def _convert_load_format(cls, value: Any) -> LoadFormat:
        if isinstance(value, LoadFormat):
            return value
        if isinstance(value, bool):
            raise ValueError(f"Invalid LoadFormat: {value}")
        if isinstance(value, int):
            return LoadFormat(value)
        name = str(value).upper()
        if name not in LoadFormat.__members__:
            raise ValueError(f"Invalid LoadFormat: {value}")
        return LoadFormat[name]

    @model_validator(mode="after")
    def _normalize(self) -> TorchLlmArgs:
        for name in ("max_batch_size", "max_input_len", "max_beam_width", "max_num_tokens"):
            if getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        if type(self.speculative_config) is EagleDecodingConfig:
            logger.warning(
                "speculative_config.decoding_type 'Eagle' is treated as 'Eagle3' "
                "on the PyTorch backend"
            )
            data = self.speculative_config.model_dump(exclude={"decoding_type"})
            self.speculative_config = Eagle3DecodingConfig(**data)
        return self


LlmArgs = TorchLlmArgs

# Nested configs a YAML file may give as mappings: turned into their config objects.
_FIELD_MAPPING: dict[str, type[StrictBaseModel]] = {
    "kv_cache_config": KvCacheConfig,
    "scheduler_config": SchedulerConfig,
    "cache_transceiver_config": CacheTransceiverConfig,
    "cuda_graph_config": CudaGraphConfig,
    "speculative_config": DecodingBaseConfig,
    "attention_dp_config": AttentionDpConfig,
    "torch_compile_config": TorchCompileConfig,
    "kv_connector_config": KvCacheConnectorConfig,
}


def update_llm_args_with_extra_dict(
    llm_args: dict, llm_args_dict: dict, extra_llm_api_options: str | None = None
) -> dict:
    """Merge YAML overrides into llm_args: kv_cache_config deep-merged, configs built."""
    llm_args_dict = dict(llm_args_dict)
    if "kv_cache_config" in llm_args and "kv_cache_config" in llm_args_dict:
        base = llm_args["kv_cache_config"]
        if isinstance(base, KvCacheConfig):
            base = base.model_dump(exclude_unset=True)
        override = llm_args_dict["kv_cache_config"]
        if isinstance(override, KvCacheConfig):
            override = override.model_dump(exclude_unset=True)
        llm_args_dict["kv_cache_config"] = dict(base or {}) | dict(override or {})
    for name, config_class in _FIELD_MAPPING.items():
        value = llm_args_dict.get(name)
        if not isinstance(value, dict):
            continue
        if config_class is DecodingBaseConfig:
            llm_args_dict[name] = DecodingBaseConfig.from_dict(value)
        else:
            llm_args_dict[name] = config_class(**value)
        if name in llm_args:
            where = (
                f" because it's specified in {extra_llm_api_options}"
                if extra_llm_api_options
                else ""
            )
            logger.info(f"YAML overrides {name}{where}")
    return llm_args | llm_args_dict


def update_llm_args_with_extra_options(llm_args: dict, extra_llm_api_options: str) -> dict:
    """Read a YAML file of LLM arguments and merge it (see update_llm_args_with_extra_dict)."""
    if extra_llm_api_options is not None:
        with open(extra_llm_api_options) as f:
            llm_args_dict = yaml.safe_load(f)
        if llm_args_dict is None:
            llm_args_dict = {}
        elif not isinstance(llm_args_dict, dict):
            raise ValueError("Configuration file root must be a mapping.")
        llm_args = update_llm_args_with_extra_dict(llm_args, llm_args_dict, extra_llm_api_options)
    return llm_args

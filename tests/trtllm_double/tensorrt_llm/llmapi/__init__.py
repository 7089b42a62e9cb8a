"""TEST DOUBLE of `tensorrt_llm.llmapi` (the LLM API names hpcserve and Dynamo import)."""

from ..disaggregated_params import DisaggregatedParams
from ..sampling_params import GuidedDecodingParams, SamplingParams
from .llm import LLM, RequestOutput
from .llm_args import (
    AttentionDpConfig,
    BatchingType,
    BuildConfig,
    CacheTransceiverConfig,
    CapacitySchedulerPolicy,
    ContextChunkingPolicy,
    CudaGraphConfig,
    DraftTargetDecodingConfig,
    DynamicBatchConfig,
    Eagle3DecodingConfig,
    EagleDecodingConfig,
    KvCacheConfig,
    KvCacheConnectorConfig,
    MTPDecodingConfig,
    NGramDecodingConfig,
    SchedulerConfig,
    TorchCompileConfig,
    TorchLlmArgs,
)

__all__ = [
    "LLM",
    "AttentionDpConfig",
    "BatchingType",
    "BuildConfig",
    "CacheTransceiverConfig",
    "CapacitySchedulerPolicy",
    "ContextChunkingPolicy",
    "CudaGraphConfig",
    "DisaggregatedParams",
    "DraftTargetDecodingConfig",
    "DynamicBatchConfig",
    "Eagle3DecodingConfig",
    "EagleDecodingConfig",
    "GuidedDecodingParams",
    "KvCacheConfig",
    "KvCacheConnectorConfig",
    "MTPDecodingConfig",
    "NGramDecodingConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "TorchCompileConfig",
    "TorchLlmArgs",
]

"""TEST DOUBLE of `tensorrt_llm.llmapi.llm_utils` (the YAML helper Dynamo imports from here)."""

from .llm_args import KvCacheConfig, update_llm_args_with_extra_options

__all__ = ["KvCacheConfig", "update_llm_args_with_extra_options"]

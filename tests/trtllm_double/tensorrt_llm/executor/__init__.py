"""TEST DOUBLE of `tensorrt_llm.executor` (results and the per-request error only)."""

from .result import CompletionOutput, GenerationResult, IterationResult, Logprob
from .utils import RequestError

__all__ = ["CompletionOutput", "GenerationResult", "IterationResult", "Logprob", "RequestError"]

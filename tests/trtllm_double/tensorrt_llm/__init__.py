"""!!! TEST DOUBLE — this is NOT NVIDIA's TensorRT-LLM !!!

A pure-Python stand-in for the `tensorrt_llm` LLM API (PyTorch flow), living in hpcserve's
tests (tests/trtllm_double) so our TensorRT-LLM adapter can be tested on machines where the
real wheel cannot be installed. It has no model, no GPU and no CUDA: tokens come from a
deterministic mixing rule, the KV cache is bookkeeping only. Names, signatures, dataclass
shapes, error types and JSON shapes follow the real library (see tests/trtllm_double/README.md
for what is faithful and what is simplified). Never ship it; never install it.
"""

from .disaggregated_params import DisaggregatedParams
from .llmapi.llm import LLM
from .sampling_params import SamplingParams

__version__ = "1.3.0rc29"
_IS_TEST_DOUBLE = True  # private marker: lets tests assert which tensorrt_llm they imported

__all__ = ["LLM", "DisaggregatedParams", "SamplingParams", "__version__"]

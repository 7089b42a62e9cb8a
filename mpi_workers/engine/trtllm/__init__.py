"""The TensorRT-LLM engine: our `Engine` interface over `tensorrt_llm.LLM` (PyTorch backend).

`tensorrt_llm` is imported lazily (only NVIDIA's container or index has it); every call the
adapter makes is one of the documented LLM API (see the README's TensorRT-LLM section).
"""

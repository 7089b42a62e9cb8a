"""Internals of the TensorRT-LLM TEST DOUBLE (not part of NVIDIA's API).

The public modules (``tensorrt_llm.llmapi``, ``tensorrt_llm.executor.result``, ...) mirror the
real library's names; everything the double needs to fake an engine lives here, so nothing
here can be mistaken for real API: token mixing (``hashing``), model folder reading
(``model_files``), the KV block pool with its events (``kv_pool``), the stepping executor
(``engine``), thread/asyncio queues (``queues``) and the MPI leader protocol (``proxy``).
"""

"""TEST DOUBLE of `tensorrt_llm.executor.utils`: the per-request error type.

The real executor reports request failures asynchronously: iterating the result raises
`RequestError` (Dynamo turns it into an error chunk without stopping the worker).
"""

from __future__ import annotations


class RequestError(RuntimeError):
    """A single request failed; the engine keeps serving others."""

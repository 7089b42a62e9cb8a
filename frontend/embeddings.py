"""`POST /v1/embeddings`: the request path of a deployment with `model.task: embed`.

Parse and validate the body (the size cap of every endpoint, the task, `dimensions` against
model.pooler.matryoshka_dimensions), tokenize each input and check it against the context
length (or cut it to `truncate_prompt_tokens`) before anything is routed; then each input is
one engine request (`GenerateRequest.pooling`) routed on its own by the deployment's router
(round robin, random, least loaded; the KV router scores it like any prompt: a LAST
embedding reads the prefix cache) to a worker whose card lists the "embed" task. The inputs
run concurrently across the workers; each answers with one chunk carrying its vector as
base64 float32, which goes out as it came for `encoding_format: base64` and as floats
otherwise. A worker lost before it answers costs nothing but time: the input is sent again
to another worker (`MigratingStream`: an embedding produces no tokens, so every retry is a
plain re-send, the lost worker excluded), and a 503 comes only when no worker is left.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from contract.messages import GenerateOutput, GenerateRequest, PoolingParams
from frontend import errors
from frontend.errors import OpenAIError, raise_for_worker_error
from frontend.migration import MigratingStream
from frontend.openai_schemas import EmbeddingRequest
from frontend.responses import AnsweredResponse
from frontend.serving import guard_disconnect, in_vocabulary, read_json_body
from frontend.state import FrontendState, check_task

ENDPOINT = "/v1/embeddings"
TOKENIZE_SLICE = 64  # inputs tokenized between two yields to the event loop


async def handle_embeddings(state: FrontendState, request: Request) -> Response:
    """The endpoint: an OpenAI embeddings response, or an OpenAI error."""
    body = EmbeddingRequest.model_validate(await read_json_body(state, request))
    if body.model is not None and body.model != state.served_name:
        raise errors.model_not_found(body.model)
    check_task(state, "embed", ENDPOINT)
    pooling = pooling_params(state, body)
    inputs = body.inputs()
    cap = state.config.frontend.max_embedding_inputs
    if len(inputs) > cap:
        raise errors.bad_request(
            f"input: {len(inputs)} inputs; at most {cap} per request "
            "(frontend.max_embedding_inputs)",
            param="input",
        )
    limit = state.context_limit()
    if limit is None:  # no worker yet: wait for one as routing would, for its context length
        await guard_disconnect(request, state.await_candidates(set()))
        limit = state.context_limit()
        assert limit is not None
    prompts = await tokenized(state, body, limit)
    response_id = "embd-" + secrets.token_hex(16)
    deadline = asyncio.get_running_loop().time() + state.config.frontend.request_timeout_s
    outputs, simulated = await guard_disconnect(
        request, embed_all(state, body, prompts, pooling, response_id, deadline)
    )
    prompt_tokens = sum(len(ids) for ids in prompts)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    state.metrics.embedding_inputs.inc(len(prompts))
    data: dict[str, Any] = {
        "id": response_id,
        "object": "list",
        "created": int(time.time()),
        "model": state.served_name,
        "data": [
            {"object": "embedding", "index": index, "embedding": _encoded(output, body)}
            for index, output in enumerate(outputs)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    if simulated:
        data["simulated"] = True
    return AnsweredResponse(data, [], response_id)


def pooling_params(state: FrontendState, body: EmbeddingRequest) -> PoolingParams:
    """The engine's pooling for `body`: the deployment's model.pooler, and `dimensions`
    where the model is configured for Matryoshka truncation (vLLM refuses it otherwise: a
    model not trained for it gives poor vectors when cut)."""
    pooler = state.config.model.pooler
    if body.dimensions is not None:
        allowed = pooler.matryoshka_dimensions
        if allowed is None:
            raise errors.bad_request(
                f"dimensions: model {state.served_name!r} does not support Matryoshka "
                "truncation (model.pooler.matryoshka_dimensions is not set)",
                param="dimensions",
            )
        if body.dimensions not in allowed:
            raise errors.bad_request(
                f"dimensions: {body.dimensions} is not one of {sorted(allowed)} "
                "(model.pooler.matryoshka_dimensions)",
                param="dimensions",
            )
    return PoolingParams(
        pooling_type=pooler.pooling_type, normalize=pooler.normalize, dimensions=body.dimensions
    )


async def tokenized(state: FrontendState, body: EmbeddingRequest, limit: int) -> list[list[int]]:
    """Each input's token ids, checked: not empty, ids in the vocabulary, at most `limit`
    tokens (else a 400 naming `input` / `input.<i>`, or cut to the last
    `truncate_prompt_tokens`). Yields to the event loop every TOKENIZE_SLICE inputs: a
    batch of 2048 texts must not hold the other requests up."""
    tokenizer = state.tokenizer
    keep = body.truncate_prompt_tokens
    if keep == -1:
        keep = limit
    if keep is not None and keep > limit:
        raise errors.bad_request(
            f"truncate_prompt_tokens: {keep} is more than the model's context length {limit}",
            param="truncate_prompt_tokens",
        )
    prompts: list[list[int]] = []
    for index, item in enumerate(body.inputs()):
        if index and index % TOKENIZE_SLICE == 0:
            await asyncio.sleep(0)
        param = body.input_param(index)
        if isinstance(item, str):
            if keep is None:
                _refuse_what_cannot_fit(state, item, param, limit)
            ids = tokenizer.encode(item, add_special_tokens=body.add_special_tokens)
        else:
            ids = in_vocabulary(state, item, param)
        if not ids:
            raise errors.bad_request(f"{param}: the input has no tokens", param=param)
        if keep is not None:
            ids = ids[-keep:]
        elif len(ids) > limit:
            raise errors.context_length_exceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{param} has {len(ids)} tokens (truncate_prompt_tokens cuts inputs to their "
                "last k tokens).",
                param=param,
            )
        prompts.append(ids)
    return prompts


def _refuse_what_cannot_fit(state: FrontendState, text: str, param: str, limit: int) -> None:
    """400 before tokenizing for a text so long that even the tokenizer's longest token per
    step could not fit it (a megabyte input is refused without seconds of tokenizing)."""
    at_least = -(-len(text) // state.tokenizer.max_token_chars)
    if at_least > limit:
        raise errors.context_length_exceeded(
            f"This model's maximum context length is {limit} tokens. However, your {param} "
            f"is at least {at_least} tokens long ({len(text)} characters).",
            param=param,
        )


async def embed_all(
    state: FrontendState,
    body: EmbeddingRequest,
    prompts: list[list[int]],
    pooling: PoolingParams,
    response_id: str,
    deadline: float,
) -> tuple[list[GenerateOutput], bool]:
    """Each prompt's answer (in order), each routed and sent on its own, all at once; and
    whether a simulated engine answered. The first input to fail fails the request; the
    others stop and are aborted on their workers."""
    streams = [
        MigratingStream(
            state.client,
            state.pick_worker,
            GenerateRequest(
                request_id=secrets.token_hex(16),
                client_id=response_id,
                token_ids=ids,
                pooling=pooling,
            ),
            limit=state.config.frontend.migration_limit,
            metrics=state.metrics,
        )
        for ids in prompts
    ]
    answers = [
        asyncio.ensure_future(_answer(stream, body.input_param(index), deadline))
        for index, stream in enumerate(streams)
    ]
    try:
        await asyncio.wait(answers, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((a for a in answers if a.done() and a.exception() is not None), None)
        if failed is not None:  # the first input to fail (in time) fails the request
            failed.result()
        outputs = [answer.result() for answer in answers]
    except TimeoutError:
        raise errors.timed_out(state.config.frontend.request_timeout_s) from None
    finally:
        for answer in answers:  # the others stop waiting (a failure, the client gone)
            answer.cancel()
        for stream in streams:  # releases the router's accounting; aborts what still runs
            stream.close()
    return outputs, any(stream.opened and stream.card.simulated for stream in streams)


async def _answer(stream: MigratingStream, param: str, deadline: float) -> GenerateOutput:
    """The one chunk of an embedding request, or the error it stands for (a worker's
    refusal names the client's field: `dimensions` for the pooling, `param` for the
    input's tokens)."""
    output = await stream.next(deadline)
    try:
        raise_for_worker_error(output, stream.card)
    except OpenAIError as exc:
        if exc.param in ("pooling", "token_ids"):
            exc.param = "dimensions" if exc.param == "pooling" else param
        raise
    if output.embedding is None:
        raise errors.worker_failed(
            f"worker {stream.card.worker_id} answered {param} without an embedding "
            f"(finish_reason {output.finish_reason})"
        )
    return output


def _encoded(output: GenerateOutput, body: EmbeddingRequest) -> str | orjson.Fragment:
    """The vector as the client asked: the worker's base64 float32 as is, or its floats as
    JSON numbers, each the shortest text of its float32 (which reads back to the same
    float32; half the bytes of the doubles' text)."""
    assert output.embedding is not None
    if body.encoding_format == "base64":
        return output.embedding
    values = np.frombuffer(base64.b64decode(output.embedding), dtype="<f4")
    return orjson.Fragment(orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY))

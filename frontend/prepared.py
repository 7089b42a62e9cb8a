"""A request as the frontend knows it before any worker sees it: the parsed body, the prompt's
token ids and the sampling settings, and what the response needs (ids, stops, stream, the
number of choices)."""

from __future__ import annotations

import secrets
import time
from typing import Literal

from contract.messages import MediaRef, SamplingParams
from frontend.openai_schemas import ChatCompletionRequest, CompletionRequest

Kind = Literal["chat", "completion"]


class Prepared:
    """Everything known about a request before it is sent to a worker."""

    __slots__ = (
        "arrival",
        "created",
        "include_usage",
        "kind",
        "logprobs",
        "media",
        "model",
        "n",
        "prompt_ids",
        "prompt_param",
        "response_id",
        "sampling",
        "stops",
        "stream",
        "user_max_tokens",
    )

    def __init__(
        self,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        model: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        arrival: float,
        media: list[MediaRef] | None = None,
    ) -> None:
        self.kind = kind
        self.arrival = arrival
        self.created = int(time.time())
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.response_id = prefix + secrets.token_hex(16)  # 32 hex digits, as uuid4().hex (cheaper)
        self.model = model
        self.prompt_ids = prompt_ids
        self.media = media or []  # the images' placeholder runs in prompt_ids
        self.prompt_param = "messages" if kind == "chat" else "prompt"
        self.sampling = sampling
        self.user_max_tokens = body.requested_max_tokens()
        self.stops = body.stop_strings()
        self.stream = body.stream
        self.n = body.num_choices()
        self.include_usage = body.include_usage_in_stream()
        self.logprobs = body.requested_logprobs()

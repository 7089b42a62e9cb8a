"""A request as the frontend knows it before any worker sees it: the parsed body, its
prompts' token ids and the sampling settings, and what the response needs (ids, stops,
stream, the number of choices).

A request has one prompt, or (/v1/completions) a batch of them; each prompt has `n`
choices, so choice `index` belongs to prompt `index // n` (OpenAI's and vLLM's order)."""

from __future__ import annotations

import secrets
import time
from typing import Literal

from contract.messages import MediaRef, SamplingParams
from frontend.openai_schemas import ChatCompletionRequest, CompletionRequest
from frontend.reasoning import ReasoningMode
from frontend.tool_calling import ToolUse

Kind = Literal["chat", "completion"]


class Prompt:
    """One prompt of a request: its token ids, the parameter that names it in errors
    (`messages`, `prompt`, `prompt.<i>` in a batch), and the text `echo` puts before its
    choices' completions (None: no echo)."""

    __slots__ = ("echo", "ids", "param")

    def __init__(self, ids: list[int], param: str, echo: str | None = None) -> None:
        self.ids = ids
        self.param = param
        self.echo = echo


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
        "num_choices",
        "prompt_only",
        "prompts",
        "reasoning",
        "response_id",
        "sampling",
        "stops",
        "stream",
        "tools",
        "user_max_tokens",
    )

    def __init__(
        self,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        model: str,
        prompts: list[Prompt],
        sampling: SamplingParams,
        arrival: float,
        media: list[MediaRef] | None = None,
        tools: ToolUse | None = None,
        reasoning: ReasoningMode | None = None,
    ) -> None:
        self.kind = kind
        self.arrival = arrival
        self.created = int(time.time())
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.response_id = prefix + secrets.token_hex(16)  # 32 hex digits, as uuid4().hex (cheaper)
        self.model = model
        self.prompts = prompts
        self.media = media or []  # the images' placeholder runs in the (one) prompt's ids
        self.sampling = sampling
        self.user_max_tokens = body.requested_max_tokens()
        # max_tokens 0 (echo + logprobs): the engine generates one token, which the response
        # leaves out (every engine generates at least one; the prompt's logprobs come first)
        self.prompt_only = self.user_max_tokens == 0
        if self.prompt_only:
            self.user_max_tokens = 1
        self.stops = body.stop_strings()
        self.stream = body.stream
        self.n = body.num_choices()  # per prompt
        self.num_choices = self.n * len(prompts)
        self.include_usage = body.include_usage_in_stream()
        self.logprobs = body.requested_logprobs()
        self.tools = tools  # a chat request's tool calling (None: a plain request)
        self.reasoning = reasoning  # a chat answer's thinking split off (frontend.reasoning)

    def prompt_of(self, choice: int) -> Prompt:
        """The prompt choice `choice` (a response index) continues."""
        return self.prompts[choice // self.n]

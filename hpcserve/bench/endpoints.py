"""What each `benchmark.endpoint` is: its path, the deployment task that serves it, what aiperf
measures of it, and a one-request probe that a URL target serves it.

aiperf 0.13 (read from its source and checked against our frontend):
- `embeddings`: one input per request, never streamed, no output tokens, so no TTFT, ITL or
  output throughput. Its parser reads no `usage`, so with `--use-server-token-count` it would
  report no input tokens either: input tokens are counted with the tokenizer instead.
- `responses`: streamed as typed SSE events; aiperf takes the usage only from
  `response.completed`, but a response cut at `max_output_tokens` (every benchmark request:
  `ignore_eos`) ends in `response.incomplete`, as OpenAI streams it. Streamed, the tokens are
  therefore counted with the tokenizer; not streamed, the response object's usage is read.
- `chat`, `completions`: the server's usage numbers (`--use-server-token-count`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Literal

PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class EndpointKind:
    """One endpoint as a sweep sees it."""

    path: str  # under /v1
    task: Literal["generate", "embed"]  # the `model.task` of a deployment that serves it
    produces_tokens: bool  # output tokens, TTFT and ITL exist at all

    def server_token_count(self, streaming: bool) -> bool:
        """Whether aiperf can take the token counts from the server's usage (see above)."""
        if self.task == "embed":
            return False
        return not (self.path == "/responses" and streaming)


# One per value of `BenchmarkConfig.endpoint`.
ENDPOINTS: dict[str, EndpointKind] = {
    "chat": EndpointKind("/chat/completions", "generate", produces_tokens=True),
    "completions": EndpointKind("/completions", "generate", produces_tokens=True),
    "responses": EndpointKind("/responses", "generate", produces_tokens=True),
    "embeddings": EndpointKind("/embeddings", "embed", produces_tokens=False),
}


def endpoint_kind(endpoint: str) -> EndpointKind:
    return ENDPOINTS[endpoint]


def task_mismatch(endpoint: str, task: str) -> str | None:
    """Why a deployment of `model.task: task` cannot answer `endpoint`; None when it can."""
    needed = endpoint_kind(endpoint).task
    if needed == task:
        return None
    return (
        f"--endpoint {endpoint} (benchmark.endpoint) needs a deployment with model.task: "
        f"{needed}, and this one has model.task: {task}; "
        + ("benchmark it with --endpoint embeddings" if task == "embed"
           else "benchmark it with --endpoint chat, completions or responses")
    )  # fmt: skip


def probe_body(endpoint: str, model: str) -> dict[str, object]:
    """The smallest request of each endpoint (one output token at most)."""
    if endpoint == "embeddings":
        return {"model": model, "input": ["ping"]}
    if endpoint == "responses":
        return {"model": model, "input": "ping", "max_output_tokens": 1, "store": False}
    if endpoint == "completions":
        return {"model": model, "prompt": "ping", "max_tokens": 1}
    return {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


def probe_refusal(
    url: str, endpoint: str, model: str, api_key: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> str | None:  # fmt: skip
    """Send one small request to `endpoint` of the server at `url` (…/v1): the server's
    refusal (an HTTP 4xx, e.g. a deployment of the other `model.task`) as a message naming
    `--endpoint`, or None when it answered. Other failures are left to the sweep to judge."""
    path = endpoint_kind(endpoint).path
    request = urllib.request.Request(
        f"{url.rstrip('/')}{path}", data=json.dumps(probe_body(endpoint, model)).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            reply.read()
        return None
    except urllib.error.HTTPError as exc:
        if not 400 <= exc.code < 500 or exc.code in (401, 403, 408, 429):
            return None  # not a refusal of the endpoint: aiperf's figures will say it
        code, said = exc.code, _error_message(exc.read())
    except OSError:
        return None
    return (
        f"--endpoint {endpoint} (benchmark.endpoint): POST /v1{path} answered {code}: {said} "
        f"(a deployment serves one model.task: embeddings need model.task: embed; chat, "
        f"completions and responses need model.task: generate)"
    )


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300] or "no message"

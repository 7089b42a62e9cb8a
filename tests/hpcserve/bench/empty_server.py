"""A FAKE OpenAI-compatible server whose answers count no output tokens: the traps a sweep
must refuse, recorded once with the real aiperf (see data/README.md); no test runs it.

`python tests/hpcserve/bench/empty_server.py PORT MODE`, MODE one of
- `empty`: 200 with empty content (aiperf counts every request as failed and exits 1);
- `nousage`: text, but no usage numbers (a server without `stream_options.include_usage`):
  aiperf succeeds and, counting the server's tokens, reports no output tokens at all.
"""

from __future__ import annotations

import json
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI()
MODEL = "SmolLM2-135M-Instruct"
MODE = sys.argv[2] if len(sys.argv) > 2 else "empty"


@app.get("/v1/models")
async def models() -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    created = int(time.time())
    text = "" if MODE == "empty" else "Hello there, this is some text."
    usage = {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10}
    if not body.get("stream"):
        usage_field = {"usage": usage} if MODE == "empty" else {}
        return JSONResponse(
            {
                "id": "empty",
                "object": "chat.completion",
                "created": created,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                **usage_field,
            }
        )

    def events():
        base = {
            "id": "empty",
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL,
        }
        deltas = [({"role": "assistant", "content": ""}, None)]
        deltas += [({"content": word + " "}, None) for word in text.split()]
        for delta, finish in [*deltas, ({}, "stop")]:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        if MODE == "empty":
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

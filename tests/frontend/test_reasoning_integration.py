"""Reasoning output end to end: the real frontend (uvicorn, etcd, nats-server) with
frontend.reasoning_parser qwen3 and a test ChatML template with Qwen3's thinking layout
(tests/frontend/templates/chatml_thinking.jinja: the prompt opens a <think> block, or closes
it empty with `chat_template_kwargs: {"enable_thinking": false}`), the official openai
client, and a real worker serving the real SmolLM2-135M `TorchEngine`: a few-shot history of
earlier answers with their thinking makes it think, close the block and answer (greedy, on
CPU, every time). The split answer is checked against the engine's own greedy text for the
same prompt ids; streamed and whole answers agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from real_workers import engine_worker, openai_client

from contract.messages import GenerateRequest, SamplingParams
from frontend.openai_schemas import ChatMessage
from frontend.reasoning import with_thinking
from frontend.tokenization import TextTokenizer
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = [pytest.mark.integration, pytest.mark.model]

TEMPLATE = Path(__file__).parent / "templates" / "chatml_thinking.jinja"
FEW_SHOT: list[Any] = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "reasoning_content": "2 plus 3 makes 5.", "content": "The answer is 5."},
    {"role": "user", "content": "What is 4 + 4?"},
    {"role": "assistant", "reasoning": "4 plus 4 makes 8.", "content": "The answer is 8."},
    {"role": "user", "content": "What is 6 + 1?"},
]
ASK = {"model": "smol", "messages": FEW_SHOT, "temperature": 0.0, "max_tokens": 40}


async def engine_text(engine: TorchEngine, tokenizer: TextTokenizer, kwargs: Any) -> str:
    """What the engine itself generates for the conversation's prompt ids (the reference)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in FEW_SHOT]
    with_thinking(messages, [ChatMessage.model_validate(m) for m in FEW_SHOT])
    ids = tokenizer.encode_chat(messages, None, kwargs)
    eos = tokenizer.eos_token_ids
    sampling = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=eos)
    request = GenerateRequest(request_id="ref", token_ids=ids, sampling=sampling)
    return tokenizer.decode((await engine.generate_all(request)).token_ids)


async def test_thinking_comes_apart_from_the_answer(make_frontend: Any, model_dir: Path) -> None:
    fe = await make_frontend(chat_template=str(TEMPLATE), reasoning_parser="qwen3")
    tokenizer = TextTokenizer(model_dir, TEMPLATE)
    engine = TorchEngine(model_dir, num_blocks=256, model_name="smol")
    async with engine_worker(fe, engine), openai_client(fe) as client:
        raw = await engine_text(engine, tokenizer, None)
        thinking, closed, answer = raw.partition("</think>")
        assert closed and thinking.strip() and answer.strip()  # the model closed its block

        whole = (await client.chat.completions.create(**ASK)).choices[0]
        assert whole.message.reasoning_content == thinking  # type: ignore[attr-defined]
        assert whole.message.reasoning == thinking  # type: ignore[attr-defined]
        assert whole.message.content == answer.lstrip()
        assert whole.finish_reason == "stop"

        thought = content = ""
        stream = await client.chat.completions.create(**ASK, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                delta = choice.delta.model_dump()
                assert delta.get("reasoning") == delta.get("reasoning_content")
                thought += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
        assert (thought, content) == (thinking, answer.lstrip())

        # the template closes the block: no thinking, the whole output is the answer
        kwargs = {"enable_thinking": False}
        off = {"chat_template_kwargs": kwargs}
        plain = (await client.chat.completions.create(**ASK, extra_body=off)).choices[0]
        assert plain.message.content == await engine_text(engine, tokenizer, kwargs)
        assert "reasoning_content" not in plain.message.model_dump(exclude_none=True)

        # include_reasoning false: the answer alone
        quiet = await client.chat.completions.create(**ASK, extra_body={"include_reasoning": False})
        message = quiet.choices[0].message.model_dump(exclude_none=True)
        assert message["content"] == answer.lstrip() and "reasoning_content" not in message


async def test_reserved_template_variables_are_refused(make_frontend: Any) -> None:
    fe = await make_frontend(chat_template=str(TEMPLATE), reasoning_parser="qwen3")
    async with openai_client(fe) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                **ASK, extra_body={"chat_template_kwargs": {"messages": []}}
            )
        error = refused.value.body
        assert error["param"] == "chat_template_kwargs"
        assert "messages" in error["message"]

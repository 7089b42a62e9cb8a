"""API keys end to end: the real frontend (uvicorn, etcd, nats-server) with
`frontend.api_key_file` and HPCSERVE_API_KEY, a FAKE worker answering. Every /v1 route (the
fast generation routes and FastAPI's) answers 401 in OpenAI's shape without a key or with a
wrong one, and serves the official openai client given a right one; probes stay open; the
OpenAPI document says which operations need a key; `hpcserve bench` sends it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from contract.api_keys import API_KEY_ENV
from contract.config import BenchmarkConfig
from hpcserve.bench.aiperf_run import aiperf_argv, shown_argv
from hpcserve.bench.sweep import TargetError, bench_api_key, served_model

pytestmark = pytest.mark.integration

CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    keys.write_text("# the team's key\nteam-key-1\n")
    keys.chmod(0o600)
    return keys


async def test_v1_routes_need_a_key_and_probes_do_not(
    make_frontend: Any, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "ops-key")
    fe = await make_frontend(api_key_file=str(key_file))
    await fe.add_worker()
    async with fe.client() as client:
        for method, path, body in [("POST", "/v1/chat/completions", CHAT),
                                   ("POST", "/v1/completions", {**CHAT, "prompt": "hi"}),
                                   ("GET", "/v1/models", None), ("GET", "/v1/models/smol", None),
                                   ("GET", "/v1/nowhere", None)]:  # fmt: skip
            missing = await client.request(method, path, json=body)
            assert missing.status_code == 401, path
            assert missing.headers["www-authenticate"] == "Bearer"
            error = missing.json()["error"]
            assert error["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in error["message"]
            wrong = await client.request(
                method, path, json=body, headers={"Authorization": "Bearer team-key-2"}
            )
            assert wrong.status_code == 401
            assert wrong.json()["error"]["message"] == "Incorrect API key provided."
            basic = await client.request(
                method, path, json=body, headers={"Authorization": "Basic team-key-1"}
            )
            assert basic.status_code == 401
        for probe in ("/health", "/live", "/metrics", "/openapi.json"):
            assert (await client.get(probe)).status_code == 200, probe
        # the scheme's name is case-insensitive; both sources' keys are accepted
        for header in ("Bearer team-key-1", "bearer ops-key"):
            answer = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": header}
            )
            assert answer.status_code == 200, header
        document = (await client.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert document["paths"]["/v1/chat/completions"]["post"]["security"] == [{"apiKey": []}]
    assert "401" in document["paths"]["/v1/models"]["get"]["responses"]
    assert "security" not in document["paths"]["/health"]["get"]

    good = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="team-key-1", max_retries=0)
    bad = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="nope", max_retries=0)
    async with good, bad:
        reply = await good.chat.completions.create(**CHAT)
        assert reply.choices[0].finish_reason in ("stop", "length")
        stream = await good.chat.completions.create(**CHAT, stream=True)
        assert [chunk async for chunk in stream]
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()

    # hpcserve bench: the key of HPCSERVE_API_KEY first, on the models call and aiperf's line
    assert bench_api_key(key_file) == "ops-key"
    url = fe.base_url + "/v1"  # (served_model blocks: off the loop the frontend runs on)
    assert await asyncio.to_thread(served_model, url, api_key="team-key-1") == "smol"
    with pytest.raises(TargetError, match="401"):
        await asyncio.to_thread(served_model, url)
    argv = aiperf_argv(BenchmarkConfig(), url=fe.base_url, model="smol", tokenizer="t",
                       concurrency=1, artifact_dir=Path("a"), api_key="team-key-1")  # fmt: skip
    assert argv[argv.index("--api-key") + 1] == "team-key-1"
    assert "team-key-1" not in shown_argv(argv) and "--api-key ***" in shown_argv(argv)


async def test_without_keys_nothing_is_checked(make_frontend: Any) -> None:
    fe = await make_frontend()
    await fe.add_worker()
    async with fe.client() as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        document = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in document["components"]

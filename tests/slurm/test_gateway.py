"""The gateway's proxying without Slurm: generation dirs with state files, and two small
HTTP servers standing in for two generations' frontends (the real ones are in
tests/slurm/test_lifecycle_e2e.py). SSE streams pass through chunk by chunk, a successor
takes new requests at its READY while a stream in flight finishes on the old one, and with
no generation up the answer is a 503 in the OpenAI error shape."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from slurm.gateway import Gateway
from slurm.jobs import deployment_dir
from slurm.state import write_state

NAME = "gw-test"


def stand_in_frontend(label: str, release: asyncio.Event) -> web.Application:
    """A frontend stand-in: /v1/models names the generation; /v1/chat/completions streams
    three SSE events, the last one only once `release` is set."""

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": label}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        assert (await request.json())["stream"] is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {label}-1\n\n".encode())
        await response.write(f"data: {label}-2\n\n".encode())
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def add_generation(job_id: str, url: str | None, state: str = "READY") -> Path:
    job_dir = deployment_dir(NAME).parent.parent / f"job-{job_id}"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_state(job_dir, state, url=url)  # type: ignore[arg-type]
    link = deployment_dir(NAME) / "generations" / job_id
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(job_dir)
    return job_dir


@pytest.fixture
def jobs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPCSERVE_SLURM_JOBS", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")  # no squeue: the Slurm check stays idle
    return tmp_path


async def test_switch_at_successor_ready_keeps_the_stream_in_flight(jobs_root: Path) -> None:
    release = asyncio.Event()
    old = TestServer(stand_in_frontend("old", release), host="127.0.0.1")
    new = TestServer(stand_in_frontend("new", release), host="127.0.0.1")
    await old.start_server()
    await new.start_server()
    gateway = Gateway(NAME, refresh_s=0.05)
    proxy = TestServer(gateway.app(), host="127.0.0.1")
    await proxy.start_server()
    base = f"http://127.0.0.1:{proxy.port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            answer = await client.get("/v1/models")
            assert answer.status_code == 503
            error = answer.json()["error"]
            assert error["type"] == "service_unavailable" and NAME in error["message"]

            add_generation("101", f"http://127.0.0.1:{old.port}/v1")
            await asyncio.sleep(0.3)
            assert (await client.get("/v1/models")).json()["data"][0]["id"] == "old"

            body = {"model": "m", "messages": [], "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                assert await anext(lines) == "data: old-1"  # streamed before the end
                # The successor comes up while the old stream is still open.
                add_generation("102", f"http://127.0.0.1:{new.port}/v1")
                await asyncio.sleep(0.3)
                assert (await client.get("/v1/models")).json()["data"][0]["id"] == "new"
                release.set()
                rest = [line async for line in lines if line]
                assert rest == ["data: old-2", "data: [DONE]"]

            # The new generation drains and ends: its successor-less predecessor is FINISHED
            # too, so nothing is up: 503 again.
            write_state(deployment_dir(NAME) / "generations" / "102", "DRAINING")
            write_state(deployment_dir(NAME) / "generations" / "101", "FINISHED")
            await asyncio.sleep(0.3)
            assert (await client.get("/v1/models")).status_code == 503
    finally:
        await proxy.close()
        await old.close()
        await new.close()


async def test_a_generation_that_refuses_is_skipped(jobs_root: Path) -> None:
    release = asyncio.Event()
    release.set()
    alive = TestServer(stand_in_frontend("alive", release), host="127.0.0.1")
    await alive.start_server()
    add_generation("7", f"http://127.0.0.1:{alive.port}/v1")
    add_generation("8", "http://127.0.0.1:1/v1")  # newest, but nothing listens there
    proxy = TestServer(Gateway(NAME).app(), host="127.0.0.1")
    await proxy.start_server()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}") as client:
            answer = await client.get("/v1/models")
            assert answer.status_code == 200 and answer.json()["data"][0]["id"] == "alive"
    finally:
        await proxy.close()
        await alive.close()

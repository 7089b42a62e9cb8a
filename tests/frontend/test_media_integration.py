"""Image requests through the real frontend app, real NATS and etcd, and a FAKE worker that
pulls each payload over the media side channel (as a real worker does) and answers a script.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from contract.media import content_hash

pytestmark = pytest.mark.integration

SEED_MODEL = "meta-llama/Llama-4-Maverick-17B-128E-Instruct"


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """3000 x 2000 px; its file is several MiB, past NATS's 1 MiB message limit."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4, size=(2000, 3000, 3), dtype=np.uint8) * 60
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def data_url(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def image_chat(url: str, text: str = "Describe the image", **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


async def test_a_multi_megapixel_image_reaches_the_worker_intact_and_is_then_forgotten(
    make_frontend: Any, tiny_vlm_dir: Path, big_png: bytes
) -> None:
    fe = await make_frontend(model=tiny_vlm_dir)
    worker = await fe.add_worker(media=["image"])
    store = fe.app.state.frontend.media_store
    assert len(big_png) > worker._nc.max_payload  # one NATS message could not carry it
    async with fe.client(timeout=60) as client:
        response = await client.post("/v1/chat/completions", json=image_chat(data_url(big_png)))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"]
        (request,) = worker.requests
        (ref,) = request.media
        assert (ref.kind, ref.width, ref.height, ref.nbytes) == (
            "image", 3000, 2000, len(big_png),
        )  # fmt: skip
        assert worker.fetched[ref.media_id] == big_png
        assert ref.content_hash == content_hash(big_png)
        assert body["usage"]["prompt_tokens"] == len(request.token_ids)
        assert request.token_ids[ref.offset : ref.offset + ref.length] == [49152] * 64
        assert len(store) == 0 and store.bytes == 0  # answered: released

        # streamed, two choices: held until the stream ends, then released
        small = Image.new("RGB", (64, 48), (9, 9, 9))
        buffer = io.BytesIO()
        small.save(buffer, format="PNG")
        streamed = await client.post(
            "/v1/chat/completions", json=image_chat(data_url(buffer.getvalue()), stream=True, n=2)
        )
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("[DONE]")
        assert [len(r.media) for r in worker.requests[1:]] == [1, 1]  # both choices
        assert len(store) == 0

        # the text path on a VLM is as before
        text = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert text.status_code == 200 and worker.requests[-1].media == []

        # what an operator sees: two images accepted, their bytes, nothing held any more
        metrics = (await client.get("/metrics")).text
        assert 'hpcserve_frontend_media_items_total{kind="image"} 2.0' in metrics
        sent = next(line for line in metrics.splitlines()
                    if line.startswith('hpcserve_frontend_media_bytes_total{kind="image"}'))
        assert float(sent.split()[-1]) == len(big_png) + len(buffer.getvalue())
        assert "hpcserve_frontend_media_store_bytes 0.0" in metrics
        assert "hpcserve_frontend_media_intake_seconds_count 2.0" in metrics


async def test_the_seeds_example_request_is_answered(
    make_frontend: Any, tiny_vlm_dir: Path
) -> None:
    """The seed's request body (its https image swapped for a data URL: nothing here
    reaches the internet)."""
    fe = await make_frontend(model=tiny_vlm_dir, served_name=SEED_MODEL)
    await fe.add_worker(media=["image", "embeds"])
    image = Image.new("RGB", (512, 512), (120, 160, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body = {
        "model": SEED_MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe the image"},
                    {"type": "image_url", "image_url": {"url": data_url(buffer.getvalue())}},
                ],
            }
        ],
        "stream": False,
        "max_tokens": 160,
    }
    async with fe.client() as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["model"] == SEED_MODEL
    assert answer["choices"][0]["message"]["role"] == "assistant"


async def test_embeddings_travel_as_raw_tensor_bytes_and_refusals_are_400s(
    make_frontend: Any, tiny_vlm_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    features = torch.randn(64, 64)
    torch.save(features, tmp_path / "cat.pt")
    fe = await make_frontend(
        model=tiny_vlm_dir, multimodal={"allowed_local_media_path": str(tmp_path)}
    )
    worker = await fe.add_worker(media=["image", "embeds"])
    async with fe.client() as client:
        response = await client.post("/v1/chat/completions", json=image_chat("cat.pt"))
        assert response.status_code == 200, response.text
        (ref,) = worker.requests[-1].media
        assert (ref.kind, ref.dtype, ref.shape) == ("embeds", "float32", [64, 64])
        assert worker.fetched[ref.media_id] == features.numpy().tobytes()

        async def refused(body: dict[str, Any], param: str, word: str) -> None:
            answer = await client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == param and word in error["message"], error
            assert error["type"] == "invalid_request_error"

        await refused(image_chat("../x.pt"), "messages.0.content.1.image_url.url", "outside")
        await refused(
            image_chat("https://example.org/a.png"),
            "messages.0.content.1.image_url.url",
            "allow_remote",
        )
        unknown = {"messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]}
        await refused(unknown, "messages.0.content.0.type", "video")
    assert len(fe.app.state.frontend.media_store) == 0

    text_fe = await make_frontend()  # SmolLM2: a text model
    await text_fe.add_worker()
    async with text_fe.client() as client:
        answer = await client.post("/v1/chat/completions", json=image_chat("cat.pt"))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"
    assert "takes no images" in answer.json()["error"]["message"]


def noise_png(seed: int, side: int = 28) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_full_store_answers_503_until_a_stream_ends_or_its_client_leaves(
    make_frontend: Any, tiny_vlm_dir: Path
) -> None:
    first, second = noise_png(1), noise_png(2)
    assert 2048 < len(first) <= 4096 and 2048 < len(second) <= 4096
    fe = await make_frontend(
        model=tiny_vlm_dir, multimodal={"max_media_bytes": 4096, "store_max_bytes": 4096}
    )
    await fe.add_worker(media=["image"], delay_s=0.05)
    store = fe.app.state.frontend.media_store
    slow = image_chat(data_url(first), stream=True, max_tokens=200, ignore_eos=True)
    async with fe.client() as client:
        async with client.stream("POST", "/v1/chat/completions", json=slow) as streaming:
            assert streaming.status_code == 200
            async for _ in streaming.aiter_bytes():
                break  # the first event came: the worker has the image, the stream runs
            assert store.bytes == len(first)
            full = await client.post("/v1/chat/completions", json=image_chat(data_url(second)))
            assert full.status_code == 503, full.text
            assert full.json()["error"]["code"] == "media_store_full"
        # the client left mid-stream: its image is released
        async with asyncio.timeout(10):
            while len(store):
                await asyncio.sleep(0.02)
        again = await client.post("/v1/chat/completions", json=image_chat(data_url(second)))
        assert again.status_code == 200, again.text
    assert len(store) == 0

"""Media intake: every way an image part is refused (a 400 naming the part) and what a good
one yields. Remote URLs against a real local aiohttp server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from PIL import Image
from safetensors.torch import save as safetensors_save

from contract.config import MultimodalConfig
from contract.media import content_hash
from contract.vlm import VlmInfo
from frontend.errors import OpenAIError
from frontend.media import MediaIntake, kind_of

VLM = VlmInfo(
    model_type="llava",
    vision_model_type="clip_vision_model",
    image_token_id=49152,
    tokens_per_image=64,
    hidden_size=64,
)
PARAM = "messages.0.content.1.image_url.url"


def png(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def tensor_file(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def intake(**settings: Any) -> MediaIntake:
    return MediaIntake(MultimodalConfig(**settings), VLM)


async def refused(intake: MediaIntake, url: str, *words: str) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        await intake.load(url, PARAM)
    error = caught.value
    assert error.status == 400 and error.param == PARAM, error.message
    assert error.message.startswith(PARAM + ": ")
    for word in words:
        assert word in error.message, error.message
    return error


# ----- data URLs ---------------------------------------------------------------------------
async def test_a_data_url_image_is_its_bytes_with_its_header_size() -> None:
    payload = png(40, 30)
    item = await intake().load(data_url(payload), PARAM)
    assert item.kind == "image" and item.payload == payload
    assert (item.width, item.height, item.length) == (40, 30, 64)
    assert item.content_hash == content_hash(payload)


async def test_data_url_garbage_and_non_images_are_refused() -> None:
    mm = intake()
    await refused(mm, "data:image/png;base64,@@@not base64@@@", "base64")
    await refused(mm, "data:image/png,rawbytes", "data:image/png;base64")
    await refused(mm, data_url(b"%PDF-1.4 not an image at all"), "not an image")
    await refused(mm, data_url(png(), mime="text/plain"), "text/plain")


async def test_too_many_pixels_is_read_from_the_header() -> None:
    await refused(intake(max_image_pixels=1000), data_url(png(40, 30)), "40x30", "max_image_pixels")


async def test_too_large_is_refused_before_decoding() -> None:
    big = data_url(os.urandom(4096))
    await refused(intake(max_media_bytes=1024), big, "max_media_bytes")


async def test_other_schemes_are_refused() -> None:
    await refused(intake(), "ftp://example.org/cat.png", "scheme")


# ----- http(s) ---------------------------------------------------------------------------
@pytest.fixture
async def image_server() -> AsyncIterator[str]:
    """A real aiohttp server: /ok.png, /big.png, /slow.png, /page.html, /emb.pt, /missing."""
    image = png(20, 10)

    async def ok(_: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    async def big(_: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})  # no length
        await response.prepare(_)
        for _i in range(8):
            await response.write(b"\0" * 8192)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        await response.write(image[:10])
        await asyncio.sleep(1.5)  # the client gives up (0.5 s) long before
        with contextlib.suppress(ConnectionError):
            await response.write(image[10:])
        return response

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")

    async def embedding(_: web.Request) -> web.Response:
        return web.Response(
            body=tensor_file(torch.ones(64, 64)), content_type="application/octet-stream"
        )

    app = web.Application()
    app.router.add_get("/ok.png", ok)
    app.router.add_get("/big.png", big)
    app.router.add_get("/slow.png", slow)
    app.router.add_get("/page.html", page)
    app.router.add_get("/emb.pt", embedding)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_remote_urls_are_refused_unless_allowed(image_server: str) -> None:
    await refused(intake(), f"{image_server}/ok.png", "allow_remote")


async def test_remote_fetch_ok_size_cap_timeout_and_content_type(image_server: str) -> None:
    mm = intake(allow_remote=True, max_media_bytes=32 * 1024, fetch_timeout_s=0.5)
    try:
        item = await mm.load(f"{image_server}/ok.png", PARAM)
        assert item.payload == png(20, 10) and (item.width, item.height) == (20, 10)
        await refused(mm, f"{image_server}/big.png", "max_media_bytes")
        await refused(mm, f"{image_server}/slow.png", "0.5 s", "fetch_timeout_s")
        await refused(mm, f"{image_server}/page.html", "text/html")
        await refused(mm, f"{image_server}/missing.png", "HTTP 404")
        embeds = await mm.load(f"{image_server}/emb.pt", PARAM)
        assert embeds.kind == "embeds" and embeds.shape == (64, 64)
    finally:
        await mm.close()


# ----- local files -------------------------------------------------------------------------
async def test_local_files_only_under_the_allowed_folder(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png(12, 8))
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(5, 5))
    (allowed / "escape.png").symlink_to(outside)

    await refused(intake(), str(allowed / "cat.png"), "allowed_local_media_path")
    mm = intake(allowed_local_media_path=str(allowed))
    for url in (str(allowed / "cat.png"), f"file://{allowed}/cat.png", "cat.png"):
        item = await mm.load(url, PARAM)
        assert (item.width, item.height) == (12, 8)
    await refused(mm, str(outside), "outside the allowed")
    await refused(mm, f"{allowed}/../secret.png", "outside the allowed")
    await refused(mm, f"file://{allowed}/escape.png", "outside the allowed")
    await refused(mm, str(allowed / "nope.png"), "no such file")


# ----- embeddings --------------------------------------------------------------------------
class _Exploit:
    """A pickle whose loading would create a file (if anything ran it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


async def test_embeddings_load_and_every_bad_one_is_refused(tmp_path: Path) -> None:
    mm = intake(allowed_local_media_path=str(tmp_path))
    good = torch.randn(1, 64, 64, dtype=torch.bfloat16)
    (tmp_path / "good.pt").write_bytes(tensor_file(good))
    item = await mm.load("good.pt", PARAM)
    assert item.kind == "embeds" and item.dtype == "bfloat16" and item.shape == (64, 64)
    assert item.payload == good[0].contiguous().view(torch.uint8).numpy().tobytes()
    (tmp_path / "good.safetensors").write_bytes(safetensors_save({"x": good[0].float()}))
    item = await mm.load("good.safetensors", PARAM)
    assert item.dtype == "float32" and len(item.payload) == 64 * 64 * 4
    assert kind_of("good.safetensors") == "embeds" and kind_of(data_url(b"x")) == "image"

    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    await refused(mm, "evil.pt", "weights_only")
    buffer = io.BytesIO()
    torch.save({"x": _Exploit(marker)}, buffer)  # torch's own zip format, same payload
    (tmp_path / "evil.bin").write_bytes(buffer.getvalue())
    await refused(mm, "evil.bin", "weights_only")
    assert not marker.exists()  # nothing of either ran

    (tmp_path / "wide.pt").write_bytes(tensor_file(torch.zeros(64, 32)))
    await refused(mm, "wide.pt", "32 wide", "hidden size is 64")
    (tmp_path / "short.pth").write_bytes(tensor_file(torch.zeros(10, 64)))
    await refused(mm, "short.pth", "10 rows", "64 per image")
    (tmp_path / "ints.bin").write_bytes(tensor_file(torch.zeros(64, 64, dtype=torch.int32)))
    await refused(mm, "ints.bin", "int32", "floating")
    (tmp_path / "two.safetensors").write_bytes(
        safetensors_save({"a": torch.zeros(64, 64), "b": torch.zeros(64, 64)})
    )
    await refused(mm, "two.safetensors", "exactly one tensor")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    await refused(mm, "junk.safetensors", "safetensors")
    (tmp_path / "big.pt").write_bytes(tensor_file(torch.zeros(64, 64)))
    small = intake(allowed_local_media_path=str(tmp_path), max_media_bytes=1024)
    await refused(small, "big.pt", "max_media_bytes")

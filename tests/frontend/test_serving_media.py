"""Image parts → prompt ids: the chat template's image token expanded to one run per image
(as transformers' LLaVA processor does it), MediaRefs at those runs, refusals before routing.
A FAKE frontend state (no NATS): only what `serving._prepare_images` reads."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from contract.config import DeploymentConfig
from contract.discovery import WorkerCard
from contract.vlm import load_vlm_info
from frontend.errors import OpenAIError
from frontend.media import MediaIntake
from frontend.media_store import MediaStore
from frontend.metrics import FrontendMetrics
from frontend.openai_schemas import ChatCompletionRequest
from frontend.serving import _prepare_images
from frontend.tokenization import TextTokenizer


def png_url(width: int, height: int, color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fake_state(model: Path, cards: list[WorkerCard] = (), **multimodal: Any) -> Any:
    config = DeploymentConfig.model_validate({"multimodal": multimodal})
    vlm = load_vlm_info(model)
    return SimpleNamespace(
        config=config,
        served_name=model.name,
        tokenizer=TextTokenizer(model),
        vlm=vlm,
        media_intake=MediaIntake(config.multimodal, vlm) if vlm else None,
        media_store=MediaStore(10 * 2**20, ttl_s=60),
        media_subject="hpcserve.test.media.fe1",
        candidates=lambda exclude: list(cards),
        metrics=FrontendMetrics(),
    )


def card(media: list[str]) -> WorkerCard:
    return WorkerCard(
        worker_id="w1", role="agg", model="m", block_size=16, subject="s", abort_subject="a",
        capacity=1, max_model_len=4096, engine="fake", media=media,
    )  # fmt: skip


def chat(*contents: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": content} for content in contents]}
    )


@pytest.fixture(scope="module")
def processor(tiny_vlm_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vlm_dir)


async def test_ids_and_offsets_match_transformers_processor(
    tiny_vlm_dir: Path, processor: Any
) -> None:
    red, blue = png_url(100, 80, (255, 0, 0)), png_url(30, 30, (0, 0, 255))
    body = chat(
        "You see two pictures.",
        [
            {"type": "text", "text": "Describe"},
            {"type": "image_url", "image_url": {"url": red}},
            {"type": "text", "text": " and"},
            {"type": "image_url", "image_url": {"url": blue, "detail": "low"}},
        ],
    )
    state = fake_state(tiny_vlm_dir)
    ids, media, hold = await _prepare_images(state, body, body.image_parts())

    messages = [
        {"role": "user", "content": [{"type": "text", "text": "You see two pictures."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"}, {"type": "image"},
                {"type": "text", "text": " and"}, {"type": "image"},
            ],
        },
    ]  # fmt: skip
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.new("RGB", (100, 80), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 255))]
    expected = processor(images=images, text=text, return_tensors="pt")["input_ids"][0].tolist()
    assert ids == expected

    image_id = state.vlm.image_token_id
    assert [(m.kind, m.length, m.width, m.height) for m in media] == [
        ("image", 64, 100, 80), ("image", 64, 30, 30),
    ]  # fmt: skip
    for ref in media:
        assert ids[ref.offset : ref.offset + ref.length] == [image_id] * 64
        assert ref.subject == "hpcserve.test.media.fe1"
        assert state.media_store.lookup(ref.media_id) is not None
    assert ids.count(image_id) == 128 and media[0].content_hash != media[1].content_hash
    hold.release()
    assert len(state.media_store) == 0


async def test_refusals_before_anything_is_held(tiny_vlm_dir: Path, model_dir: Path) -> None:
    url = png_url(8, 8, (1, 2, 3))
    one = chat([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}])

    async def refused(state: Any, body: ChatCompletionRequest, param: str, *words: str) -> None:
        with pytest.raises(OpenAIError) as caught:
            await _prepare_images(state, body, body.image_parts())
        assert caught.value.status == 400 and caught.value.param == param
        for word in words:
            assert word in caught.value.message
        assert len(state.media_store) == 0

    await refused(fake_state(model_dir), one, "messages", "text-only", "takes no images")
    await refused(fake_state(tiny_vlm_dir, [card([])]), one, "messages", "takes no images")
    await refused(
        fake_state(tiny_vlm_dir, [card(["image"])]),
        chat([{"type": "image_url", "image_url": {"url": "emb.pt"}}]),
        "messages", "precomputed image embeddings",
    )  # fmt: skip
    three = chat([{"type": "image_url", "image_url": {"url": url}}] * 3)
    await refused(
        fake_state(tiny_vlm_dir, max_images_per_request=2),
        three, "messages.0.content.2.image_url.url", "at most 2 images",
    )  # fmt: skip
    literal = chat(
        [{"type": "text", "text": "<image>"}, {"type": "image_url", "image_url": {"url": url}}]
    )
    await refused(fake_state(tiny_vlm_dir), literal, "messages", "2 image placeholders for 1")
    bad = chat(
        [{"type": "image_url", "image_url": {"url": url}}],
        [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
    )
    await refused(
        fake_state(tiny_vlm_dir), bad, "messages.1.content.0.image_url.url", "not an image"
    )

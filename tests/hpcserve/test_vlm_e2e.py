"""`hpcserve up configs/local-vlm.yaml` end to end: images in chat requests through the real
frontend, NATS side channel, worker and built-in engine of a tiny RANDOM-weight LLaVA.

The reference is transformers' own `LlavaForConditionalGeneration.generate` on the same
folder (fp32 greedy): our answers must be its tokens. Also: the seed's example body (with a
data: URL: nothing here reaches the internet), the precomputed-embedding path equal to the
image path, prefix caching by image through the KV router, a multi-megapixel image, and
disaggregated serving equal to aggregated. Two deployments in all (agg, then disagg).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from up_helpers import UpProcess, openai_client, started

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
QUESTION = "Describe the image"


def png(width: int, height: int, seed: int) -> bytes:
    """A noisy RGB image as PNG bytes (noise: no two seeds look alike to the encoder)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def chat_body(*urls: str, question: str = QUESTION) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": question}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts}]


class Reference:
    """transformers on the same folder: the processor's inputs and greedy tokens."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()

    def inputs(self, images: list[bytes], question: str = QUESTION) -> dict:
        from PIL import Image

        content = [{"type": "text", "text": question}] + [{"type": "image"} for _ in images]
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images] or None
        return self.processor(images=pictures, text=text, return_tensors="pt")

    def text(self, images: list[bytes], question: str = QUESTION) -> str:
        import torch

        inputs = self.inputs(images, question)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True)

    def features(self, image: bytes) -> torch.Tensor:  # noqa: F821 (torch imported lazily)
        """The encoder + projector output for `image`: what an embedding file holds."""
        import torch

        pixel_values = self.inputs([image])["pixel_values"]
        with torch.inference_mode():
            features = self.model.get_image_features(pixel_values=pixel_values)
        if not isinstance(features, torch.Tensor):  # some versions return a list / output
            features = getattr(features, "pooler_output", features)
            features = features[0] if isinstance(features, (list, tuple)) else features
        return features.reshape(-1, features.shape[-1]).contiguous()


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir: Path) -> Reference:
    return Reference(tiny_vlm_dir)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory, tiny_vlm_dir: Path, media_dir: Path):
    run_dir = tmp_path_factory.mktemp("vlm-agg")
    args = [
        "configs/local-vlm.yaml", "--set", "frontend.port=0",
        "--set", f"multimodal.allowed_local_media_path={media_dir}",
    ]  # fmt: skip
    with started(args, run_dir) as up:
        yield up


def chat(up: UpProcess, messages: list[dict], **extra):
    client = openai_client(up)
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, max_tokens=MAX_TOKENS,
        temperature=0.0, **extra,
    )  # fmt: skip


def test_image_answer_is_transformers_greedy(agg: UpProcess, reference: Reference) -> None:
    image = png(80, 60, seed=1)
    response = chat(agg, chat_body(data_url(image)))
    assert response.choices[0].message.content == reference.text([image])
    prompt_ids = reference.inputs([image])["input_ids"]
    assert response.usage.prompt_tokens == prompt_ids.shape[1]


def test_two_images_and_streaming(agg: UpProcess, reference: Reference) -> None:
    first, second = png(64, 64, seed=2), png(90, 50, seed=3)
    client = openai_client(agg)
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=chat_body(data_url(first), data_url(second)),
        max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
    )  # fmt: skip
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reference.text([first, second])


def test_seed_example_request_is_answered(agg: UpProcess) -> None:
    """The seed's own body (Dynamo's TensorRT-LLM README), the https URL swapped for data:."""
    import httpx

    body = {
        "model": "ignored-below",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe the image"},
            {"type": "image_url", "image_url": {"url": data_url(png(128, 96, seed=4))}},
        ]}],
        "stream": False,
        "max_tokens": 160,
    }  # fmt: skip
    body["model"] = openai_client(agg).models.list().data[0].id
    response = httpx.post(f"{agg.base_url}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["finish_reason"] in ("stop", "length")


def test_embedding_file_equals_image(
    agg: UpProcess, reference: Reference, media_dir: Path
) -> None:
    import torch

    image = png(70, 70, seed=5)
    path = media_dir / "features.pt"
    torch.save(reference.features(image), path)
    by_image = chat(agg, chat_body(data_url(image))).choices[0].message.content
    by_embedding = chat(agg, chat_body(str(path))).choices[0].message.content
    assert by_embedding == by_image == reference.text([image])


def test_prefix_cache_follows_the_image(agg: UpProcess) -> None:
    image, other = png(64, 48, seed=6), png(64, 48, seed=7)
    question = "Which colours dominate this picture? " * 4  # blocks before the image too
    first = chat(agg, chat_body(data_url(image), question=question))
    again = chat(agg, chat_body(data_url(image), question=question))
    changed = chat(agg, chat_body(data_url(other), question=question))
    cached = [
        (r.usage.prompt_tokens_details.cached_tokens or 0) if r.usage.prompt_tokens_details else 0
        for r in (first, again, changed)
    ]
    assert cached[1] > cached[2]  # the same image hits past the text ...
    assert cached[1] >= first.usage.prompt_tokens - 16  # ... all but the last block
    # a different image shares only the text blocks before the image starts
    assert cached[2] < first.usage.prompt_tokens - 64


def test_multi_megapixel_image(agg: UpProcess, reference: Reference) -> None:
    """A 3000×2000 image (a file larger than one NATS message) is served like any other."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(8)
    pixels = np.repeat(rng.integers(0, 256, (2000, 300, 3), dtype=np.uint8), 10, axis=1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    image = out.getvalue()
    assert len(image) > 1024 * 1024
    response = chat(agg, chat_body(data_url(image)))
    assert response.choices[0].message.content == reference.text([image])


def test_bad_image_is_a_400(agg: UpProcess) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        chat(agg, chat_body("data:image/png;base64," + base64.b64encode(b"not a png").decode()))
    assert refused.value.status_code == 400
    assert "messages" in (refused.value.body or {}).get("param", "")


def test_disaggregated_equals_aggregated(
    agg: UpProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    images = [png(64, 64, seed=9), png(50, 80, seed=10)]
    expected = [chat(agg, chat_body(data_url(i))).choices[0].message.content for i in images]
    run_dir = tmp_path_factory.mktemp("vlm-disagg")
    args = [
        "configs/local-disagg.yaml", "--set", "frontend.port=0",
        "--set", "model.prepared=tiny-vlm", "--set", "disaggregation.kv_transfer=tcp",
    ]  # fmt: skip
    with started(args, run_dir) as disagg:
        got = [chat(disagg, chat_body(data_url(i))).choices[0].message.content for i in images]
    assert got == expected

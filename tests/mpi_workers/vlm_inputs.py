"""Test inputs for the vision-language path: images, prompts with expanded placeholder runs
(what the frontend sends), and their `MediaRef`s. Shared by the engine, TP and worker tests."""

from __future__ import annotations

import io
from typing import Any

import torch

from contract.media import content_hash
from contract.messages import GenerateOutput, GenerateRequest, MediaRef, SamplingParams

SUBJECT = "hpcserve.test.media.frontend0"


def image_bytes(seed: int, width: int = 80, height: int = 60, fmt: str = "PNG") -> bytes:
    """A random RGB image, encoded as the client would send it."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format=fmt)
    return out.getvalue()


def open_image(payload: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(payload)).convert("RGB")


def prompt_text(num_images: int, question: str = "What is in the picture?") -> str:
    images = "".join(f"Image {i + 1}: <image>\n" for i in range(num_images))
    return f"<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"


def processor_inputs(processor: Any, images: list[bytes], question: str = "What is in it?"):
    """transformers' inputs (input_ids with expanded image runs, pixel_values)."""
    return processor(
        text=prompt_text(len(images), question),
        images=[open_image(b) for b in images],
        return_tensors="pt",
    )


def image_runs(token_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of the image token."""
    runs: list[tuple[int, int]] = []
    for index, token in enumerate(token_ids):
        if token != image_token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def image_refs(token_ids: list[int], image_token_id: int, payloads: list[bytes],
               media_ids: list[str] | None = None) -> list[MediaRef]:  # fmt: skip
    runs = image_runs(token_ids, image_token_id)
    assert len(runs) == len(payloads)
    return [
        MediaRef(kind="image", offset=offset, length=length, content_hash=content_hash(payload),
                 subject=SUBJECT, media_id=(media_ids or [f"m{i}" for i in range(len(runs))])[i],
                 nbytes=len(payload))
        for i, ((offset, length), payload) in enumerate(zip(runs, payloads, strict=True))
    ]


def embeds_ref(offset: int, features: torch.Tensor, media_id: str = "e0") -> tuple[MediaRef, bytes]:
    """A precomputed-embedding ref and its raw payload (float32 [length, hidden])."""
    payload = features.detach().to(torch.float32).contiguous().numpy().tobytes()
    ref = MediaRef(kind="embeds", offset=offset, length=features.shape[0],
                   content_hash=content_hash(payload), subject=SUBJECT, media_id=media_id,
                   nbytes=len(payload), dtype="float32", shape=list(features.shape))  # fmt: skip
    return ref, payload


def request(rid: str, token_ids: list[int], media: list[MediaRef], max_tokens: int = 10,
            **sampling: Any) -> GenerateRequest:  # fmt: skip
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(
        request_id=rid, token_ids=token_ids, media=media,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
    )  # fmt: skip


async def reply_chunks(nc: Any, subject: str, request: GenerateRequest, timeout_s: float = 60):
    """Send `request` to a worker's subject as the frontend does; every chunk of its reply,
    up to the one with a finish reason."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    await nc.publish(subject, request.model_dump_json().encode(), reply=inbox)
    chunks: list[GenerateOutput] = []
    try:
        while True:
            msg = await subscription.next_msg(timeout=timeout_s)
            chunks.append(GenerateOutput.model_validate_json(msg.data))
            if chunks[-1].finish_reason is not None:
                return chunks
    finally:
        await subscription.unsubscribe()

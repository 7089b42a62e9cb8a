"""What an image costs: time to first token of image requests vs the same request with the
image's precomputed embedding vs a text-only request of equal prompt length, through a real
deployment (`configs/local-vlm.yaml`: the tiny random LLaVA, one torch worker); and how many
images per second the two halves of image intake handle — the frontend's (URL, header, hash,
media store) and the worker's (decode + the model's image processor) — against transformers'
own processor pipeline (decode + preprocess) in the same process as the baseline.

TTFT is the latency of a `max_tokens: 1` chat request, one at a time, each with a fresh image
(no prefix-cache hits). Figures are ratios to the same run's text-only / transformers baseline.

    python benchmarks/bench_multimodal.py [--requests 16] [--width 640 --height 480]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.config import load_config
from hpcserve.launcher import start_deployment, stop_deployment

REPO = Path(__file__).resolve().parents[1]


def photo(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A camera-like image: smooth gradients plus noise, encoded as `fmt`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, quality=90)
    return out.getvalue()


def data_url(image: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(image).decode()


def image_message(url: str, question: str = "Describe the image") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}},
    ]}]  # fmt: skip


async def first_token_s(client: httpx.AsyncClient, model: str, messages: list) -> tuple[float, int]:
    """(latency of a max_tokens=1 request, its prompt tokens)."""
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0.0}
    start = time.perf_counter()
    response = await client.post("/chat/completions", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()["usage"]["prompt_tokens"]


def features_files(model_dir: Path, images: list[bytes], paths: list[Path]) -> None:
    """Each image's encoder + projector output as an embedding file (transformers computes
    them: the model is loaded once)."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    for image, path in zip(images, paths, strict=True):
        picture = Image.open(io.BytesIO(image)).convert("RGB")
        pixels = processor.image_processor(picture, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = model.get_image_features(pixel_values=pixels)
        if not isinstance(features, torch.Tensor):
            features = getattr(features, "pooler_output", features)
            features = features[0] if isinstance(features, (list, tuple)) else features
        torch.save(features.reshape(-1, features.shape[-1]).contiguous(), path)


async def served(args: argparse.Namespace, media_dir: Path) -> dict[str, float]:
    config = load_config(
        REPO / "configs" / "local-vlm.yaml",
        overrides=["frontend.port=0", f"multimodal.allowed_local_media_path={media_dir}",
                   "frontend.router=round_robin"],
    )  # fmt: skip
    deployment = await asyncio.to_thread(start_deployment, config, lambda _m: None)
    model_dir = Path(deployment.config.model.path or "")
    print(f"model {model_dir.name}: {args.requests} requests of each kind, one at a time")
    images = [photo(args.width, args.height, seed) for seed in range(args.requests + 1)]
    files = [media_dir / f"features-{index}.pt" for index in range(len(images))]
    await asyncio.to_thread(features_files, model_dir, images, files)
    try:
        async with httpx.AsyncClient(base_url=deployment.url, timeout=600) as client:
            model = (await client.get("/models")).json()["data"][0]["id"]
            warm = image_message(data_url(images[-1]))
            _, prompt_tokens = await first_token_s(client, model, warm)
            filler = " cat" * prompt_tokens
            for _ in range(3):  # a text prompt of the image request's token count
                text = f"Request 0:{filler}"
                _, n = await first_token_s(client, model, [{"role": "user", "content": text}])
                filler = " cat" * (filler.count(" cat") + prompt_tokens - n)
            times: dict[str, list[float]] = {"image": [], "embeds": [], "text": []}
            text_tokens = []
            for index in range(args.requests):
                t, _ = await first_token_s(client, model, image_message(data_url(images[index])))
                times["image"].append(t)
                t, _ = await first_token_s(client, model, image_message(str(files[index])))
                times["embeds"].append(t)
                text = f"Request {index}:{filler}"
                t, n = await first_token_s(client, model, [{"role": "user", "content": text}])
                times["text"].append(t)
                text_tokens.append(n)
    finally:
        await asyncio.to_thread(stop_deployment, deployment, lambda _m: None)
    medians = {kind: statistics.median(values) * 1000 for kind, values in times.items()}
    print(f"prompt tokens: image request {prompt_tokens}, "
          f"text-only {statistics.median(text_tokens)}")  # fmt: skip
    for kind, value in medians.items():
        print(f"TTFT p50 {kind:>6}: {value:8.2f} ms  ({value / medians['text']:.2f}x text-only)")
    return medians


def intake_rates(args: argparse.Namespace, model_dir: Path, seconds: float) -> dict[str, float]:
    """Images per second through each intake half (one thread each) and through
    transformers' own processor pipeline (decode + preprocess), the baseline."""
    from PIL import Image
    from transformers import AutoProcessor

    from contract.config import MultimodalConfig
    from contract.media import content_hash
    from contract.messages import GenerateRequest, MediaRef
    from contract.vlm import load_vlm_info
    from frontend.media import MediaIntake
    from mpi_workers.engine.torch.engine import TorchEngine

    image = photo(args.width, args.height, seed=99)
    url = data_url(image)
    info = load_vlm_info(model_dir)
    assert info is not None
    processor = AutoProcessor.from_pretrained(model_dir)
    intake = MediaIntake(MultimodalConfig(), info)
    engine = TorchEngine(model_dir)  # not started: prepare_media needs no stepping thread
    ref = MediaRef(kind="image", offset=0, length=info.tokens_per_image,
                   content_hash=content_hash(image), subject="bench", media_id="m",
                   nbytes=len(image))  # fmt: skip
    request = GenerateRequest(request_id="r", token_ids=[info.image_token_id] * ref.length,
                              media=[ref])  # fmt: skip
    loop = asyncio.new_event_loop()

    def reference() -> None:
        picture = Image.open(io.BytesIO(image)).convert("RGB")
        processor.image_processor(picture, return_tensors="pt")

    rates = {
        "transformers decode+preprocess": rate(reference, seconds),
        "frontend intake": rate(lambda: loop.run_until_complete(intake.load(url, "m")), seconds),
        "worker decode+preprocess": rate(lambda: engine.prepare_media(request, [image]), seconds),
    }
    loop.close()
    base = rates["transformers decode+preprocess"]
    print(f"intake of one {args.width}x{args.height} JPEG ({len(image)} bytes), one thread each:")
    for name, value in rates.items():
        print(f"  {name:>32}: {value:9.1f} images/s  ({value / base:.2f}x transformers)")
    return rates


def rate(fn: Any, seconds: float) -> float:
    fn()  # warm: lazy imports, caches
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--seconds", type=float, default=3.0, help="per intake measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as media:
        medians = asyncio.run(served(args, Path(media)))
    from hpcserve.model_prepare import prepare_model

    rates = intake_rates(args, prepare_model("tiny-vlm"), args.seconds)
    print(
        "multimodal "
        f"ttft_image_vs_text={medians['image'] / medians['text']:.2f} "
        f"ttft_embeds_vs_text={medians['embeds'] / medians['text']:.2f} "
        f"frontend_intake_img_s={rates['frontend intake']:.0f} "
        f"worker_prepare_vs_transformers="
        f"{rates['worker decode+preprocess'] / rates['transformers decode+preprocess']:.2f}"
    )


if __name__ == "__main__":
    main()

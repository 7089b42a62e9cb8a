"""Time to first token of image requests on the built-in torch engine vs the same request
with precomputed embeddings vs a text-only prompt of equal token count, and images/s of the
worker's `prepare_media` (decode + preprocess) for a small and a full-HD JPEG.

Default model: the tiny random LLaVA (`hpcserve model prepare --tiny-vlm`; its tower is
tiny, so the image overhead here is a floor); `--model-dir` takes any LLaVA folder. CPU
fp32 unless `--device cuda`. Prefix caching is off so every request computes its prompt.
Last line: `vlm_engine ttft_image_vs_text=<x> ttft_embeds_vs_text=<y>
prepare_img_per_s_640x480=<a> prepare_img_per_s_1920x1080=<b>`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.media import content_hash
from contract.messages import GenerateRequest, MediaRef, SamplingParams
from contract.vlm import load_vlm_info
from mpi_workers.engine.torch.engine import TorchEngine


def jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="JPEG", quality=90)
    return out.getvalue()


def request(rid: str, ids: list[int], media: list[MediaRef]) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    return GenerateRequest(request_id=rid, token_ids=ids, media=media, sampling=sampling)


async def ttft(engine: TorchEngine, make, reps: int) -> float:
    """Median seconds from generate to the first (only) token; `make(i)` gives
    (request, prepared media) — preparation is not timed here."""
    times = []
    for i in range(reps + 1):
        req, media = make(i)
        start = time.perf_counter()
        await engine.generate_all(req, media)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--text-tokens", type=int, default=40, help="text around the image")
    args = parser.parse_args()
    if args.model_dir is None:
        from hpcserve.tiny_vlm import prepare_tiny_vlm

        args.model_dir = prepare_tiny_vlm()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    info = load_vlm_info(args.model_dir)
    assert info is not None, f"{args.model_dir} is not a vision-language model"
    engine = TorchEngine(args.model_dir, device=args.device, enable_prefix_caching=False,
                         max_num_batched_tokens=8192)  # fmt: skip
    await engine.start()
    n, before = info.tokens_per_image, args.text_tokens // 2
    text = [100 + (i % 500) for i in range(args.text_tokens)]
    ids = text[:before] + [info.image_token_id] * n + text[before:]
    image = jpeg(640, 480, 0)

    def image_ref(payload: bytes) -> MediaRef:
        return MediaRef(kind="image", offset=before, length=n, content_hash=content_hash(payload),
                        subject="bench", media_id="i", nbytes=len(payload))  # fmt: skip

    prepared = engine.prepare_media(request("p", ids, [image_ref(image)]), [image])
    pixels = prepared[0].pixels
    with torch.inference_mode():
        features = engine.vision.encode(pixels.to(engine.device))[0].float().cpu()
    payload = features.numpy().tobytes()
    embeds = MediaRef(kind="embeds", offset=before, length=n, content_hash=content_hash(payload),
                      subject="bench", media_id="e", nbytes=len(payload), dtype="float32",
                      shape=list(features.shape))  # fmt: skip

    def with_image(i: int):
        req = request(f"img{i}", ids, [image_ref(image)])
        return req, engine.prepare_media(req, [image])

    def with_embeds(i: int):
        req = request(f"emb{i}", ids, [embeds])
        return req, engine.prepare_media(req, [payload])

    def text_only(i: int):
        return request(f"txt{i}", text[:before] + [101] * n + text[before:], []), None

    t_text = await ttft(engine, text_only, args.reps)
    t_image = await ttft(engine, with_image, args.reps)
    t_embeds = await ttft(engine, with_embeds, args.reps)
    print(f"prompt {len(ids)} tokens ({n} image rows): TTFT text {t_text * 1e3:.2f} ms, "
          f"image {t_image * 1e3:.2f} ms, embeddings {t_embeds * 1e3:.2f} ms")  # fmt: skip
    rates = {}
    for width, height in ((640, 480), (1920, 1080)):
        payload_img = jpeg(width, height, 1)
        req = request("prep", ids, [image_ref(payload_img)])
        engine.prepare_media(req, [payload_img])  # warm-up (loads the processor)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            engine.prepare_media(req, [payload_img])
            count += 1
        rates[f"{width}x{height}"] = count / (time.perf_counter() - start)
        print(f"prepare_media {width}x{height} JPEG ({len(payload_img)} bytes): "
              f"{rates[f'{width}x{height}']:.1f} images/s on one thread")  # fmt: skip
    await engine.shutdown()
    print(f"vlm_engine ttft_image_vs_text={t_image / t_text:.3f} "
          f"ttft_embeds_vs_text={t_embeds / t_text:.3f} "
          f"prepare_img_per_s_640x480={rates['640x480']:.1f} "
          f"prepare_img_per_s_1920x1080={rates['1920x1080']:.1f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

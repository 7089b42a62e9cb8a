"""The vision-language path of the torch engine on CUDA (`pytest -m gpu`; skipped without
CUDA or without the tiny VLM folder, `hpcserve model prepare --tiny-vlm`): with CUDA graphs,
overlapped scheduling and the Triton kernels on, fp32 greedy tokens equal transformers' on
the same GPU (one image; two images, one of them 1600x1200); in bf16 (the GPU default) the
embeddings path equals the image path and the same image twice is a prefix hit with the
same tokens. Steps holding image rows replay their own mixed-step graphs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/mpi_workers

import vlm_inputs as vi

from contract.config import prepared_model_dir
from contract.vlm import load_vlm_info
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def vlm_dir() -> Path:
    path = prepared_model_dir("tiny-vlm")
    if not (path / ".complete").is_file():
        pytest.skip(f"no tiny VLM at {path}: hpcserve model prepare --tiny-vlm")
    return path


async def generate(engine: TorchEngine, images: list[bytes], ids: list[int], rid: str):
    token = load_vlm_info(engine.model_dir).image_token_id
    request = vi.request(rid, ids, vi.image_refs(ids, token, images), MAX_TOKENS)
    return await engine.generate_all(request, engine.prepare_media(request, images))


def test_fp32_tokens_equal_transformers_on_cuda(vlm_dir: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    processor = AutoProcessor.from_pretrained(str(vlm_dir))
    cases = [[vi.image_bytes(1)], [vi.image_bytes(2, 300, 200), vi.image_bytes(3, 1600, 1200)]]
    inputs = [vi.processor_inputs(processor, images) for images in cases]
    ref = LlavaForConditionalGeneration.from_pretrained(str(vlm_dir), dtype=torch.float32)
    ref = ref.to("cuda").eval()
    expected = []
    for x in inputs:
        with torch.no_grad():
            out = ref.generate(**x.to("cuda"), max_new_tokens=MAX_TOKENS, do_sample=False)
        expected.append(out[0, x["input_ids"].shape[1] :].tolist())
    del ref

    async def run() -> tuple[list[list[int]], bool, int]:
        engine = TorchEngine(vlm_dir, device="cuda", dtype=torch.float32, max_num_seqs=8)
        await engine.start()
        try:
            outs = await asyncio.gather(*(
                generate(engine, images, x["input_ids"][0].tolist(), f"fp32-{i}")
                for i, (images, x) in enumerate(zip(cases, inputs, strict=True))
            ))  # fmt: skip
            graphs = engine.runner.graphs
            image_graphs = 0 if graphs is None else sum(key[3] for key in graphs.mixed)
            return [o.token_ids for o in outs], image_graphs, engine.stats.num_overlapped_steps
        finally:
            await engine.shutdown()

    got, image_graphs, overlapped = asyncio.run(run())
    assert got == expected
    assert image_graphs > 0  # the image prefill steps replayed graphs with image rows
    assert overlapped > 0


def test_bf16_embeddings_equal_image_and_prefix_hit(vlm_dir: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(vlm_dir))
    images = [vi.image_bytes(4)]
    ids = vi.processor_inputs(processor, images)["input_ids"][0].tolist()
    token = load_vlm_info(vlm_dir).image_token_id

    async def run():
        engine = TorchEngine(vlm_dir, device="cuda", max_num_seqs=8)  # bf16
        await engine.start()
        try:
            by_image = await generate(engine, images, ids, "image")
            again = await generate(engine, images, ids, "again")
            probe = vi.request("p", ids, vi.image_refs(ids, token, images))
            prepared = engine.prepare_media(probe, images)
            with torch.inference_mode():
                features = engine.vision.encode(prepared[0].pixels.to("cuda"))[0].float().cpu()
            offset = vi.image_runs(ids, token)[0][0]
            ref, payload = vi.embeds_ref(offset, features)
            request = vi.request("embeds", ids, [ref], MAX_TOKENS)
            by_embeds = await engine.generate_all(request, engine.prepare_media(request, [payload]))
            return by_image, again, by_embeds
        finally:
            await engine.shutdown()

    by_image, again, by_embeds = asyncio.run(run())
    assert again.token_ids == by_image.token_ids
    assert again.num_cached_tokens >= load_vlm_info(vlm_dir).tokens_per_image
    assert by_embeds.token_ids == by_image.token_ids

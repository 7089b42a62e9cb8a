"""The torch engine's vision-language path on the tiny random LLaVA folders, against
transformers' own `LlavaForConditionalGeneration` + `AutoProcessor` on the same folder
(fp32, greedy: token-identical). Also: two images, an image across prefill chunks, the
precomputed-embedding path, prefix caching with the same and different images, refusals,
and a disaggregated prefill → decode hand-off (with a preempted decode recomputing)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/mpi_workers

import vlm_inputs as vi

from contract.vlm import load_vlm_info
from mpi_workers.engine.torch.engine import TorchEngine

MAX_TOKENS = 10


class Reference:
    """transformers on the same folder: processor inputs and greedy generate."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        self.model = LlavaForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=torch.float32
        ).eval()
        self.info = load_vlm_info(model_dir)

    def inputs(self, images: list[bytes], question: str = "What is in it?") -> Any:
        return vi.processor_inputs(self.processor, images, question)

    def generate(self, inputs: Any, max_tokens: int = MAX_TOKENS) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        with torch.no_grad():
            out = self.model.model.get_image_features(
                pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )  # fmt: skip
        return out.pooler_output[0]


def build(model_dir: Path, **kwargs: Any) -> TorchEngine:
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("num_blocks", 64)
    return TorchEngine(model_dir, max_num_seqs=4, **kwargs)


async def start(model_dir: Path, **kwargs: Any) -> TorchEngine:
    engine = build(model_dir, **kwargs)
    await engine.start()
    return engine


@pytest.fixture(scope="module")
def clip_ref(tiny_vlm_dir: Path) -> Reference:
    return Reference(tiny_vlm_dir)


@pytest.fixture(scope="module")
def clip_engine(tiny_vlm_dir: Path):
    engine = build(tiny_vlm_dir)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


async def run(engine: TorchEngine, images: list[bytes], ids: list[int], rid: str,
              max_tokens: int = MAX_TOKENS):  # fmt: skip
    info = load_vlm_info(engine.model_dir)
    request = vi.request(rid, ids, vi.image_refs(ids, info.image_token_id, images), max_tokens)
    media = await asyncio.to_thread(engine.prepare_media, request, images)
    return await engine.generate_all(request, media)


def ids_of(inputs: Any) -> list[int]:
    return inputs["input_ids"][0].tolist()


def test_engine_takes_images(clip_engine: TorchEngine) -> None:
    assert clip_engine.media_kinds == {"image", "embeds"}
    assert clip_engine.vision is not None


@pytest.mark.parametrize("tower", ["clip", "siglip"])
async def test_image_matches_transformers(tower, clip_engine, clip_ref, tiny_vlm_siglip_dir):
    images = [vi.image_bytes(10, 97, 51)]
    if tower == "clip":
        engine, ref = clip_engine, clip_ref
    else:
        ref = Reference(tiny_vlm_siglip_dir)
        engine = await start(tiny_vlm_siglip_dir)
    try:
        inputs = ref.inputs(images)
        ids = ids_of(inputs)
        assert ids.count(ref.info.image_token_id) == ref.info.tokens_per_image == 64
        expected = ref.generate(inputs)
        out = await run(engine, images, ids, f"{tower}-1")
        assert out.token_ids == expected
        assert out.num_prompt_tokens == len(ids)
    finally:
        if engine is not clip_engine:
            await engine.shutdown()


async def test_image_changes_the_answer(clip_engine, clip_ref) -> None:
    """The features are used: another image, same text, another answer."""
    outs = []
    for seed in (20, 21):
        images = [vi.image_bytes(seed)]
        outs.append((await run(clip_engine, images, ids_of(clip_ref.inputs(images)),
                               f"change-{seed}")).token_ids)  # fmt: skip
    assert outs[0] != outs[1]


async def test_two_images_in_one_request(clip_engine, clip_ref) -> None:
    images = [vi.image_bytes(30, 64, 64), vi.image_bytes(31, 120, 40, fmt="JPEG")]
    inputs = clip_ref.inputs(images, "Compare them.")
    ids = ids_of(inputs)
    assert len(vi.image_runs(ids, clip_ref.info.image_token_id)) == 2
    expected = clip_ref.generate(inputs)
    out = await run(clip_engine, images, ids, "two")
    assert out.token_ids == expected


async def test_image_spanning_prefill_chunks(tiny_vlm_dir, clip_ref) -> None:
    """max_num_batched_tokens 24: the 64 image rows arrive in several chunks."""
    engine = await start(tiny_vlm_dir, max_num_batched_tokens=24, block_size=4, num_blocks=128)
    try:
        images = [vi.image_bytes(40), vi.image_bytes(41)]
        inputs = clip_ref.inputs(images, "Two?")
        expected = clip_ref.generate(inputs)
        steps = engine.stats.num_steps
        out = await run(engine, images, ids_of(inputs), "chunks")
        assert out.token_ids == expected
        prefill_steps = -(-len(ids_of(inputs)) // 24)
        assert engine.stats.num_steps - steps >= prefill_steps > 5
    finally:
        await engine.shutdown()


async def test_embeddings_equal_the_image_path(clip_engine, clip_ref) -> None:
    images = [vi.image_bytes(50)]
    inputs = clip_ref.inputs(images)
    ids = ids_of(inputs)
    by_image = await run(clip_engine, images, ids, "emb-image")
    features = clip_ref.features(inputs["pixel_values"])
    (offset, length), = vi.image_runs(ids, clip_ref.info.image_token_id)
    assert features.shape == (length, clip_ref.info.hidden_size)
    ref, payload = vi.embeds_ref(offset, features)
    request = vi.request("emb-embeds", ids, [ref])
    media = clip_engine.prepare_media(request, [payload])
    by_embeds = await clip_engine.generate_all(request, media)
    assert by_embeds.token_ids == by_image.token_ids == clip_ref.generate(inputs)
    assert by_embeds.num_cached_tokens == 0  # an embedding is not the image's blocks


async def test_prefix_cache_same_image_hits_different_image_misses(clip_engine, clip_ref):
    first = [vi.image_bytes(60)]
    ids = ids_of(clip_ref.inputs(first, "Describe the picture in detail please."))
    a = await run(clip_engine, first, ids, "cache-a")
    assert a.num_cached_tokens == 0
    again = await run(clip_engine, first, ids, "cache-b")
    assert again.num_cached_tokens >= 64  # the image's blocks came from the cache
    assert again.token_ids == a.token_ids
    other = [vi.image_bytes(61)]
    ids_other = ids_of(clip_ref.inputs(other, "Describe the picture in detail please."))
    assert ids_other == ids  # same tokens, only the image differs
    c = await run(clip_engine, other, ids, "cache-c")
    offset = vi.image_runs(ids, clip_ref.info.image_token_id)[0][0]
    assert c.num_cached_tokens <= offset  # at most the text before the image
    assert c.token_ids != a.token_ids


async def test_kv_events_name_image_blocks_by_image(clip_engine, clip_ref) -> None:
    from contract.block_hash import block_hashes, media_block_extras

    images = [vi.image_bytes(65)]
    ids = ids_of(clip_ref.inputs(images, "Hashes?"))
    hashes = set(clip_engine.cached_block_hashes())
    await run(clip_engine, images, ids, "events", max_tokens=1)
    refs = vi.image_refs(ids, clip_ref.info.image_token_id, images)
    runs = [(r.offset, r.length, r.content_hash) for r in refs]
    extras = media_block_extras(runs, clip_engine.block_size)
    expected = block_hashes(ids, clip_engine.block_size, extras)
    published = set(clip_engine.cached_block_hashes()) - hashes
    assert set(expected[: (len(ids) - 1) // clip_engine.block_size]) <= published | hashes
    assert not set(block_hashes(ids, clip_engine.block_size)) & published  # text-only hashes


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("broken image", "messages: image 1 could not be decoded"),
        ("embeds shape", r"messages: image 1 \(embeddings\): shape"),
        ("embeds bytes", "messages: image 1 .*bytes"),
        ("too many pixels", "messages: image 1: 80x60 exceeds 4000 pixels"),
    ],
)
def test_bad_payloads_refused_naming_messages(clip_engine, clip_ref, case, match, monkeypatch):
    images = [vi.image_bytes(70)]
    ids = ids_of(clip_ref.inputs(images))
    info = clip_ref.info
    payload = images[0]
    refs = vi.image_refs(ids, info.image_token_id, images)
    if case == "broken image":
        payload = payload[:40] + b"\0" * 200
    elif case == "too many pixels":
        monkeypatch.setattr(clip_engine.media_inputs, "max_image_pixels", 4000)
    else:
        offset, length = refs[0].offset, refs[0].length
        hidden = info.hidden_size - 1 if case == "embeds shape" else info.hidden_size
        refs[0], payload = vi.embeds_ref(offset, torch.zeros(length, hidden))
        if case == "embeds bytes":
            payload = payload[:-4]
    with pytest.raises(ValueError, match=match) as error:
        clip_engine.prepare_media(vi.request(f"bad-{case}", ids, refs), [payload])
    assert getattr(error.value, "param", None) == "messages"


def test_bad_placeholders_refused(clip_engine, clip_ref, tiny_vlm_dir) -> None:
    images = [vi.image_bytes(72)]
    ids = ids_of(clip_ref.inputs(images))
    ref = vi.image_refs(ids, clip_ref.info.image_token_id, images)[0]
    short = ref.model_copy(update={"length": ref.length - 1})
    with pytest.raises(ValueError, match="messages: image 1: 63 placeholder tokens"):
        clip_engine.validate(vi.request("bad-len", ids, [short]))
    moved = ref.model_copy(update={"offset": ref.offset - 1})
    with pytest.raises(ValueError, match="messages: image 1: its positions"):
        clip_engine.validate(vi.request("bad-pos", ids, [moved]))


async def test_disaggregated_prefill_then_decode_equals_aggregated(
    clip_engine, clip_ref, tiny_vlm_dir
) -> None:
    """The prefill engine encodes the image and holds the KV; the decode engine reserves
    (image-aware hashes), imports, decodes; it is then preempted with its cache dropped, so
    it recomputes the whole prompt from the media it kept: still the aggregated tokens."""
    images = [vi.image_bytes(80)]
    ids = ids_of(clip_ref.inputs(images, "Split me."))
    aggregated = await run(clip_engine, images, ids, "agg", max_tokens=16)
    decode = await start(tiny_vlm_dir)
    try:
        info = clip_ref.info
        request = vi.request("dis", ids, vi.image_refs(ids, info.image_token_id, images), 16)
        prefill_media = clip_engine.prepare_media(request, images)
        await clip_engine.reset_prefix_cache()
        held = await clip_engine.prefill_and_hold(request, prefill_media)
        decode_media = decode.prepare_media(request, images)
        reservation = await decode.reserve(request)  # the hashes need only request.media
        assert reservation is not None and reservation.skip_blocks == 0
        staging = await clip_engine.export_held(held, reservation.skip_blocks)
        await decode.import_kv(reservation, staging)
        tokens = list(held.first.token_ids)
        preempted = False
        async for output in decode.decode_reserved(reservation, held.first, held.sampler_state,
                                                   decode_media):  # fmt: skip
            tokens.extend(output.token_ids)
            if not preempted and output.finish_reason is None:
                preempted = await decode.call_in_engine_thread(lambda: preempt(decode, "dis"))
        assert preempted
        assert decode.stats.num_preemptions == 1
        assert tokens == aggregated.token_ids
        # a second identical request on the decode side reuses the image's blocks
        again = await decode.reserve(request.model_copy(update={"request_id": "dis2"}),
                                     decode_media)  # fmt: skip
        assert again is not None and again.skip_blocks > 0
        await decode.release_reservation(again)
    finally:
        await decode.shutdown()


def preempt(engine: TorchEngine, request_id: str) -> bool:
    """Stepping thread: preempt `request_id` and forget every cached block, so its KV
    (the image's included) must be recomputed."""
    seq = engine.scheduler.find(request_id)
    if seq is None or seq not in engine.scheduler.running:
        return False
    engine.scheduler._preempt(seq)
    engine.block_manager.reset_prefix_cache()
    return True


async def test_overlapped_scheduling_with_images(tiny_vlm_dir, clip_ref) -> None:
    """Overlapped steps (forced on the CPU) encode and place the image rows alike; two
    concurrent requests with different images each get transformers' answer."""
    engine = await start(tiny_vlm_dir, overlap=True, max_num_batched_tokens=48)
    try:
        cases = [[vi.image_bytes(95)], [vi.image_bytes(96), vi.image_bytes(97)]]
        inputs = [clip_ref.inputs(images) for images in cases]
        outs = await asyncio.gather(*(
            run(engine, images, ids_of(x), f"overlap-{i}")
            for i, (images, x) in enumerate(zip(cases, inputs, strict=True))
        ))  # fmt: skip
        assert engine.stats.num_overlapped_steps > 0
        for out, x in zip(outs, inputs, strict=True):
            assert out.token_ids == clip_ref.generate(x)
    finally:
        await engine.shutdown()

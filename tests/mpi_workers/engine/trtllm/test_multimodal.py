"""Images and precomputed embeddings through the TensorRT-LLM adapter, against the TEST
DOUBLE of `tensorrt_llm` (`tests/trtllm_double`; it records what `generate_async` got and
folds a digest of the images into its fake tokens)."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from contract.config import load_config
from contract.media import content_hash
from contract.messages import GenerateOutput, GenerateRequest, MediaRef, SamplingParams
from contract.vlm import load_vlm_info
from mpi_workers.engine.factory import build_engine
from mpi_workers.engine.trtllm.engine import TrtllmEngine
from mpi_workers.engine.trtllm.multimodal import apply_patch, prompt_patch, vlm_of
from mpi_workers.worker import error_param  # how the worker names the field to the client

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "trtllm_double"))
from double_env import activate

activate()

REPO = Path(__file__).resolve().parents[4]
IMG = 49152  # the tiny VLM's <image> token


def _engine(model: Path) -> TrtllmEngine:
    config = load_config(
        REPO / "configs/local-trtllm-agg.yaml",
        ["engine.trtllm.override_engine_args={cache_transceiver_config: {backend: UCX}}"],
        environ={},
    )
    engine = build_engine(config, model)
    assert isinstance(engine, TrtllmEngine)
    return engine


@pytest.fixture
async def engine(tiny_vlm_dir: Path) -> AsyncIterator[TrtllmEngine]:
    eng = _engine(tiny_vlm_dir)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_ref(payload: bytes, offset: int, length: int = 64, **extra: Any) -> MediaRef:
    fields: dict[str, Any] = {"width": 40, "height": 30, **extra}
    return MediaRef(
        kind="image", offset=offset, length=length, content_hash=content_hash(payload),
        subject="media.test", media_id=uuid.uuid4().hex, nbytes=len(payload), **fields,
    )  # fmt: skip


def embeds(seed: int, rows: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def embeds_ref(tensor: torch.Tensor, offset: int, **extra: Any) -> tuple[MediaRef, bytes]:
    payload = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    fields: dict[str, Any] = {
        "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), **extra,
    }  # fmt: skip
    ref = MediaRef(
        kind="embeds", offset=offset, length=tensor.shape[0], content_hash=content_hash(payload),
        subject="media.test", media_id=uuid.uuid4().hex, nbytes=len(payload), **fields,
    )  # fmt: skip
    return ref, payload


def two_image_prompt() -> list[int]:
    """Text, image 1 (64 placeholders), text, image 2, text: as our frontend expands it."""
    return [1, 2, *[IMG] * 64, 3, *[IMG] * 64, 4, 5]


COLLAPSED = [1, 2, IMG, 3, IMG, 4, 5]


def request(ids: list[int], media: list[MediaRef], **sampling: Any) -> GenerateRequest:
    params = {"temperature": 0.0, "max_tokens": 8, **sampling}
    return GenerateRequest(
        request_id=uuid.uuid4().hex, token_ids=ids, media=media, sampling=SamplingParams(**params)
    )


def image_request(a: bytes, b: bytes, **sampling: Any) -> tuple[GenerateRequest, list[bytes]]:
    media = [image_ref(a, 2), image_ref(b, 67)]
    return request(two_image_prompt(), media, **sampling), [a, b]


async def run(engine: TrtllmEngine, req: GenerateRequest, payloads: list[bytes]) -> list[int]:
    prepared = engine.prepare_media(req, payloads)
    tokens, last = await collect(engine.generate(req, media=prepared))
    assert last.finish_reason in ("stop", "length")
    assert last.num_prompt_tokens == len(req.token_ids)
    return tokens


async def collect(stream: AsyncIterator[GenerateOutput]) -> tuple[list[int], GenerateOutput]:
    tokens: list[int] = []
    last = None
    async for chunk in stream:
        tokens.extend(chunk.token_ids)
        last = chunk
    assert last is not None and last.finish_reason is not None, last
    return tokens, last


def last_inputs(engine: TrtllmEngine) -> tuple[dict[str, Any], str]:
    inputs, kind = engine.llm._double_inputs[-1]  # the double's record of generate_async
    return inputs, kind


# ----- which worker takes images ----------------------------------------------------------


def test_media_kinds_follow_the_model(tiny_vlm_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    vlm = _engine(tiny_vlm_dir)
    text = _engine(model_dir)
    try:
        assert vlm.media_kinds == {"image", "embeds"}
        assert text.media_kinds == frozenset()
    finally:
        vlm.llm.shutdown()
        text.llm.shutdown()
    # A VLM TensorRT-LLM serves but our frontend cannot place images for (their count
    # depends on the image size): text only, never a crash.
    config = json.loads((tiny_vlm_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    assert vlm_of(tmp_path) is None
    assert vlm_of(tiny_vlm_dir) == load_vlm_info(tiny_vlm_dir)


# ----- passthrough ------------------------------------------------------------------------


async def test_two_images_reach_tensorrt_llm_with_each_run_collapsed(
    engine: TrtllmEngine,
) -> None:
    red, blue = png((200, 10, 10)), png((10, 10, 200), size=(40, 30))
    req, payloads = image_request(red, blue)
    await run(engine, req, payloads)
    inputs, kind = last_inputs(engine)
    assert kind == "aggregated"
    assert set(inputs) == {"prompt_token_ids", "multi_modal_data"}
    assert inputs["prompt_token_ids"] == COLLAPSED
    images = inputs["multi_modal_data"]["image"]
    assert [type(i).__name__ for i in images] == ["Image", "Image"]
    assert [(i.mode, i.size) for i in images] == [("RGB", (40, 30))] * 2
    assert images[0].getpixel((5, 5)) == (200, 10, 10)
    assert images[1].getpixel((5, 5)) == (10, 10, 200)


async def test_embeddings_reach_tensorrt_llm_as_tensors_of_their_dtype(
    engine: TrtllmEngine,
) -> None:
    first, second = embeds(1, dtype=torch.bfloat16), embeds(2, dtype=torch.bfloat16)
    (ref1, p1), (ref2, p2) = embeds_ref(first, 2), embeds_ref(second, 67)
    req = request(two_image_prompt(), [ref1, ref2])
    await run(engine, req, [p1, p2])
    inputs, _ = last_inputs(engine)
    # the text prompt, as Dynamo 1.6.1 sends embeddings (TRTLLM-11294): TensorRT-LLM's own
    # tokenizer turns it back into exactly our collapsed ids
    assert set(inputs) == {"prompt", "multi_modal_embeddings"}
    assert engine.llm.tokenizer.encode(inputs["prompt"], add_special_tokens=False) == COLLAPSED
    tensors = inputs["multi_modal_embeddings"]["image"]
    assert [(t.dtype, tuple(t.shape)) for t in tensors] == [(torch.bfloat16, (64, 64))] * 2
    assert torch.equal(tensors[0], first) and torch.equal(tensors[1], second)


async def test_outputs_follow_the_images(engine: TrtllmEngine) -> None:
    red, blue = png((200, 10, 10)), png((10, 10, 200))
    red_blue = await run(engine, *image_request(red, blue))
    again = await run(engine, *image_request(png((200, 10, 10)), blue))
    blue_red = await run(engine, *image_request(blue, red))
    assert red_blue == again
    assert red_blue != blue_red
    tensors = [embeds_ref(embeds(seed), offset) for seed, offset in ((1, 2), (2, 67))]
    one = await run(
        engine, request(two_image_prompt(), [r for r, _ in tensors]), [p for _, p in tensors]
    )
    same = await run(
        engine, request(two_image_prompt(), [r for r, _ in tensors]), [p for _, p in tensors]
    )
    other = [embeds_ref(embeds(seed), offset) for seed, offset in ((1, 2), (3, 67))]
    changed = await run(
        engine, request(two_image_prompt(), [r for r, _ in other]), [p for _, p in other]
    )
    assert one == same and one != changed


# ----- refusals -----------------------------------------------------------------------------


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ValueError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__anext__"):  # a stream refuses when it is made, not later
            pytest.fail("the stream was made")
    message = str(caught.value)
    assert message.startswith("messages: ") and error_param(caught.value) == "messages"
    return message


async def test_what_tensorrt_llm_cannot_take_is_refused_naming_messages(
    engine: TrtllmEngine, model_dir: Path
) -> None:
    red = png((200, 10, 10))
    submitted = len(engine.llm._double_inputs)
    tensor_ref, tensor_bytes = embeds_ref(embeds(1), 67)
    mixed = request(two_image_prompt(), [image_ref(red, 2), tensor_ref])
    assert "either images or precomputed embeddings" in refused(
        engine.prepare_media, mixed, [red, tensor_bytes]
    )
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    req, _ = image_request(red, red)
    assert "image 2 cannot be decoded" in refused(engine.prepare_media, req, [red, broken])
    assert "header said" in refused(
        engine.prepare_media, request(two_image_prompt()[:67], [image_ref(red, 2, width=41)]), [red]
    )
    wide, wide_bytes = embeds_ref(embeds(1)[:, :32].contiguous(), 2, shape=[64, 32])
    assert "shape" in refused(
        engine.prepare_media, request(two_image_prompt()[:67], [wide]), [wide_bytes]
    )
    short_ref, short_bytes = embeds_ref(embeds(1), 2)
    assert "bytes" in refused(
        engine.prepare_media, request(two_image_prompt()[:67], [short_ref]), [short_bytes[:-4]]
    )
    # embeddings go in as text: ids that TensorRT-LLM's tokenizer would merge differently
    tokenizer = engine.llm.tokenizer
    unmerged = tokenizer.encode("h", add_special_tokens=False) + tokenizer.encode(
        "ello", add_special_tokens=False
    )
    assert tokenizer.encode("hello", add_special_tokens=False) != unmerged
    odd_ref, odd_bytes = embeds_ref(embeds(1), len(unmerged))
    odd = request([*unmerged, *[IMG] * 64], [odd_ref])
    assert "round trip" in refused(engine.prepare_media, odd, [odd_bytes])
    # placeholder runs that do not match the ids, or a stray image token in the text
    shifted = request(two_image_prompt(), [image_ref(red, 3), image_ref(red, 67)])
    assert "placeholder run" in refused(engine.prepare_media, shifted, [red, red])
    stray = request([IMG, *two_image_prompt()], [image_ref(red, 3), image_ref(red, 68)])
    assert "outside its images' placeholder runs" in refused(
        engine.prepare_media, stray, [red, red]
    )
    # media never prepared: refused, not silently served as text
    assert "not prepared" in refused(engine.generate, image_request(red, red)[0])
    assert len(engine.llm._double_inputs) == submitted  # nothing reached TensorRT-LLM
    # a text model takes no images at all
    text = _engine(model_dir)
    try:
        req, payloads = image_request(red, red)
        assert "takes no image" in refused(text.validate, req)
        assert "takes no images" in refused(text.prepare_media, req, payloads)
    finally:
        text.llm.shutdown()


# ----- disaggregated ------------------------------------------------------------------------


async def test_context_then_generation_with_images_equals_aggregated(
    engine: TrtllmEngine,
) -> None:
    red, blue = png((200, 10, 10)), png((10, 10, 200))
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 5}):
        agg = await run(engine, *image_request(red, blue, **sampling))
        req, payloads = image_request(red, blue, **sampling)
        first, blob = await engine.prefill_only(req, media=engine.prepare_media(req, payloads))
        context_inputs, kind = last_inputs(engine)
        assert kind == "context_only" and "multi_modal_data" in context_inputs
        assert first.num_prompt_tokens == len(req.token_ids)
        # the decode side gets the prompt as TensorRT-LLM expanded it, compactly: only the
        # two image runs differ from ours (the double marks them with vocab_size + 1)
        segments = blob["multimodal_prompt"]["prompt_segments"]
        assert [(start, len(ids)) for start, ids in segments] == [(2, 64), (67, 64)]
        blob = json.loads(json.dumps(blob))  # it crosses NATS as JSON
        disagg, last = await collect(engine.generate_from_prefill(req, blob))
        decode_inputs, kind = last_inputs(engine)
        assert kind == "generation_only"
        assert set(decode_inputs) == {"prompt_token_ids"}  # no images on the decode side
        assert decode_inputs["prompt_token_ids"] == apply_patch(
            req.token_ids, blob["multimodal_prompt"]
        )
        assert disagg == agg, sampling
        assert last.num_prompt_tokens == len(req.token_ids)
    # the same with precomputed embeddings (their context phase gets the text prompt)
    tensors = [embeds_ref(embeds(seed), offset) for seed, offset in ((4, 2), (5, 67))]
    refs, payloads = [r for r, _ in tensors], [p for _, p in tensors]
    agg = await run(engine, request(two_image_prompt(), refs), payloads)
    req = request(two_image_prompt(), refs)
    _, blob = await engine.prefill_only(req, media=engine.prepare_media(req, payloads))
    assert "multi_modal_embeddings" in last_inputs(engine)[0]
    disagg, _ = await collect(engine.generate_from_prefill(req, json.loads(json.dumps(blob))))
    assert set(last_inputs(engine)[0]) == {"prompt_token_ids"}
    assert disagg == agg
    # the decode side cannot do without the expanded prompt
    req, payloads = image_request(red, blue)
    _, blob = await engine.prefill_only(req, media=engine.prepare_media(req, payloads))
    del blob["multimodal_prompt"]
    with pytest.raises(RuntimeError, match="the prefill worker sent no expanded prompt"):
        engine.generate_from_prefill(req, blob)


def test_prompt_patch_round_trips() -> None:
    ours = [1, 2, 9, 9, 9, 3, 9, 9, 4]
    theirs = [1, 2, 7, 7, 7, 3, 7, 7, 4]
    patch = prompt_patch(ours, theirs)
    assert patch == {"prompt_segments": [[2, [7, 7, 7]], [6, [7, 7]]]}
    assert apply_patch(ours, patch) == theirs
    longer = [1, 2, 7, 7, 7, 7, 3, 7, 7, 4]
    assert apply_patch(ours, prompt_patch(ours, longer)) == longer


# ----- the double refuses what the real API would -------------------------------------------


def test_the_double_refuses_malformed_multimodal_inputs(
    engine: TrtllmEngine, model_dir: Path
) -> None:
    from tensorrt_llm import DisaggregatedParams
    from tensorrt_llm import SamplingParams as TrtSampling

    llm = engine.llm
    red = Image.new("RGB", (8, 8), (1, 2, 3))
    params = TrtSampling(max_tokens=2, end_id=-1)
    cases = {
        "Number of images": {
            "prompt_token_ids": [1, IMG, 2],
            "multi_modal_data": {"image": [red, red]},
        },
        "silently drop": {
            "prompt_token_ids": [1, IMG],
            "multi_modal_data": {"image": [red]},
            "multi_modal_embeddings": {"image": [embeds(1)]},
        },
        "embedding_dim": {
            "prompt_token_ids": [IMG],
            "multi_modal_embeddings": {"image": [embeds(1)[:, :8]]},
        },
        "only the image modality": {
            "prompt_token_ids": [IMG],
            "multi_modal_data": {"video": [red]},
        },
    }
    for expected, inputs in cases.items():
        with pytest.raises((ValueError, TypeError), match=expected):
            llm.generate_async(inputs, sampling_params=params)
    with pytest.raises(TypeError, match="PIL images"):
        llm.generate_async(
            {"prompt_token_ids": [IMG], "multi_modal_data": {"image": [b"png"]}},
            sampling_params=params,
        )
    gen_only = DisaggregatedParams(
        request_type="generation_only", first_gen_tokens=[5], opaque_state=b"{}"
    )
    with pytest.raises(ValueError, match="generation_only"):
        llm.generate_async(
            {"prompt_token_ids": [IMG], "multi_modal_data": {"image": [red]}},
            sampling_params=params,
            disaggregated_params=gen_only,
        )
    text = _engine(model_dir)
    try:
        with pytest.raises(ValueError, match="not a multimodal model"):
            text.llm.generate_async(
                {"prompt_token_ids": [1], "multi_modal_data": {"image": [red]}},
                sampling_params=params,
            )
    finally:
        text.llm.shutdown()


async def test_kv_events_of_an_image_request_stop_at_its_first_image(
    engine: TrtllmEngine,
) -> None:
    """The router hears of the text blocks before the first image, never of image blocks
    (TensorRT-LLM names them by its own image hash, which our frontend cannot compute)."""
    from contract.block_hash import block_hashes

    seen: list = []
    engine.set_kv_event_sink(seen.extend)
    text = list(range(100, 140))  # 40 text tokens: 2 full blocks of 16 before the image
    req = request([*text, *[IMG] * 64, 5, 6], [image_ref(png((1, 2, 3)), 40)], max_tokens=2)
    await run(engine, req, [png((1, 2, 3))])
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.05)
    stored = [
        h for event in seen if event.kind == "stored" for h in event.block_hashes
    ]
    assert stored == block_hashes(text, 16)[:2]

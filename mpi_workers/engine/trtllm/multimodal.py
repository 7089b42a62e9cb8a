"""Our images and precomputed embeddings as TensorRT-LLM's multimodal inputs.

What TensorRT-LLM's LLM API takes (PyTorch flow), and where that is written down:
- `generate_async({"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL, ...]}})` or
  `{"prompt_token_ids": ids, "multi_modal_embeddings": {"image": [tensor, ...]}}`: the
  "fast path for token IDs & MM data" of `BaseLLM._preprocess` in the newest source
  (NVIDIA/TensorRT-LLM `tensorrt_llm/llmapi/llm.py`); `TokensPrompt.multi_modal_data` in
  `inputs/data.py`. Dynamo's TensorRT-LLM worker (ai-dynamo/dynamo
  `components/src/dynamo/trtllm/multimodal_processor.py`, `.../request_handlers/handler_base.py`)
  sends the first dict for images; for embeddings see below.
- `ids` hold ONE image token per image: the model's input processor expands each into that
  image's feature rows itself (`LlavaNextInputProcessor._postprocess`: "mm_token_positions",
  one per media; `attach_multimodal_embeddings`: one [rows, hidden] tensor per image token;
  processors without `supports_token_id_mm_expansion` detokenize the ids and run the HF
  processor, which also expands each `<image>`). Our frontend already expanded each image to
  `MediaRef.length` copies, so every run is collapsed back to one token here.
- Embeddings go in with the TEXT prompt (`{"prompt", "multi_modal_embeddings"}`), as Dynamo
  1.6.1 sends them for TensorRT-LLM 1.3.0rc29 ("temporary workaround to bypass TRT-LLM's bug
  where token IDs & embeddings are not processed correctly", TRTLLM-11294, in Dynamo's
  `multimodal_processor.py`; older `_preprocess` versions take the plain `prompt_token_ids`
  branch first and drop the embeddings). The text is our collapsed ids decoded by
  TensorRT-LLM's own tokenizer, and re-encoding it must give the same ids (checked here,
  `add_special_tokens` off), so the prompt is the one the client's template made.
- `_preprocess` takes `multi_modal_data` first and then silently ignores
  `multi_modal_embeddings`: a request holding both images and embeddings cannot be passed
  through (Dynamo's docs say the same: "either image URLs or embedding file paths in a single
  request"), so it is refused naming "messages".
- Disaggregation: the generation-only request needs no multimodal input, only the prompt ids
  as the context phase's input processor expanded them (`RequestOutput.prompt_token_ids`) and
  the disaggregated params: `_preprocess` ("when running in `generation_only` for disagg,
  this is the code path we expect to hit": prompt_token_ids without MM data), and Dynamo's
  decode handler ("DECODE never needs to reload images - KV cache has the context": it sends
  the prefill's `_prefill_prompt_token_ids` with `multi_modal_data: None`).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.messages import GenerateRequest, MediaRef
from contract.vlm import VlmInfo, load_vlm_info
from mpi_workers.engine.streaming import RequestValidationError

logger = logging.getLogger(__name__)

TORCH_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class TrtllmMedia:
    """A request's media as TensorRT-LLM takes them: `key` is the input dict's key
    ("multi_modal_data" for images, "multi_modal_embeddings" for embeddings), `items` the
    RGB PIL images or [rows, hidden] tensors in prompt order; `prompt_ids` the request's ids
    with each placeholder run collapsed, `text` those ids as text (embeddings only)."""

    key: str
    items: list[Any]
    prompt_ids: list[int]
    text: str | None = None

    def inputs(self) -> dict[str, Any]:
        """The `generate_async` input dict."""
        prompt: dict[str, Any] = (
            {"prompt": self.text}
            if self.text is not None
            else {"prompt_token_ids": self.prompt_ids}
        )
        return {**prompt, self.key: {"image": list(self.items)}}


def vlm_of(model_dir: str | Path) -> VlmInfo | None:
    """The model's VLM facts, or None for a text model and for a VLM our frontend cannot
    place images for (then the worker takes no images; text requests still work)."""
    try:
        return load_vlm_info(model_dir)
    except ValueError as exc:
        # TensorRT-LLM may well serve this VLM, but our frontend expands a fixed number of
        # placeholders per image (`contract.vlm`); a model whose count depends on the image
        # (LLaVA-NeXT, Qwen2-VL) would get prompts that do not match: take no images.
        logger.warning("TensorRT-LLM worker takes no images for this model: %s", exc)
        return None


def prepare(
    request: GenerateRequest, payloads: list[bytes], vlm: VlmInfo, tokenizer: Any
) -> TrtllmMedia:
    """Decode `request.media`'s fetched payloads (same order) into TensorRT-LLM's inputs
    (`tokenizer`: TensorRT-LLM's, for the embeddings' text prompt). ValueError naming
    "messages" for media TensorRT-LLM cannot take."""
    media = request.media
    if len(payloads) != len(media):
        raise RequestValidationError(
            "messages", f"{len(media)} media references but {len(payloads)} payloads"
        )
    kinds = {ref.kind for ref in media}
    if not kinds:
        raise RequestValidationError("messages", "the request holds no images")
    if len(kinds) > 1:
        raise RequestValidationError(
            "messages",
            "TensorRT-LLM takes either images or precomputed embeddings in one request, not both",
        )
    collapsed = collapse_placeholders(request, vlm.image_token_id)
    pairs = list(enumerate(zip(media, payloads, strict=True)))
    if kinds == {"image"}:
        images = [_image(i, ref, p, vlm) for i, (ref, p) in pairs]
        return TrtllmMedia("multi_modal_data", images, collapsed)
    tensors = [_embedding(i, ref, p, vlm) for i, (ref, p) in pairs]
    return TrtllmMedia("multi_modal_embeddings", tensors, collapsed, _text(collapsed, tokenizer))


def _text(ids: list[int], tokenizer: Any) -> str:
    """`ids` as the text prompt TensorRT-LLM tokenizes back into exactly `ids`."""
    if tokenizer is None:
        raise RequestValidationError(
            "messages",
            "precomputed embeddings need TensorRT-LLM's tokenizer (skip_tokenizer_init is set)",
        )
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if list(tokenizer.encode(text, add_special_tokens=False)) != ids:
        raise RequestValidationError(
            "messages",
            "this prompt does not survive the detokenize/retokenize round trip TensorRT-LLM "
            "needs to place precomputed embeddings",
        )
    return text


def _image(index: int, ref: MediaRef, payload: bytes, vlm: VlmInfo) -> Any:
    from PIL import Image, UnidentifiedImageError

    if ref.length != vlm.tokens_per_image:
        raise RequestValidationError(
            "messages",
            f"image {index + 1} has {ref.length} placeholder tokens; this model "
            f"takes {vlm.tokens_per_image} per image",
        )
    try:
        with Image.open(io.BytesIO(payload)) as opened:
            opened.load()
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestValidationError(
            "messages", f"image {index + 1} cannot be decoded: {exc}"
        ) from None
    if ref.width is not None and ref.height is not None and image.size != (ref.width, ref.height):
        raise RequestValidationError(
            "messages",
            f"image {index + 1} decodes to {image.size[0]}x{image.size[1]}, its "
            f"header said {ref.width}x{ref.height}",
        )
    return image


def _embedding(index: int, ref: MediaRef, payload: bytes, vlm: VlmInfo) -> Any:
    import torch

    if ref.dtype not in TORCH_DTYPES:
        raise RequestValidationError(
            "messages", f"embedding {index + 1} has dtype {ref.dtype!r}, not one of {TORCH_DTYPES}"
        )
    expected = [ref.length, vlm.hidden_size]
    if ref.shape != expected:
        raise RequestValidationError(
            "messages", f"embedding {index + 1} has shape {ref.shape}; this model takes {expected}"
        )
    dtype = getattr(torch, ref.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(payload) != math.prod(expected) * itemsize:
        raise RequestValidationError(
            "messages",
            f"embedding {index + 1} holds {len(payload)} bytes, not {expected} {ref.dtype}",
        )
    return torch.frombuffer(bytearray(payload), dtype=dtype).reshape(expected)


def collapse_placeholders(request: GenerateRequest, image_token_id: int) -> list[int]:
    """`request.token_ids` with each image's placeholder run (`MediaRef.offset`/`length`,
    all `image_token_id`) cut back to one `image_token_id`, as TensorRT-LLM's input processor
    wants it. ValueError naming "messages" when the runs and the ids disagree."""
    ids = request.token_ids
    collapsed: list[int] = []
    cursor = 0
    for index, ref in enumerate(sorted(request.media, key=lambda ref: ref.offset)):
        run = ids[ref.offset : ref.offset + ref.length]
        if ref.offset < cursor or len(run) != ref.length or any(t != image_token_id for t in run):
            raise RequestValidationError(
                "messages",
                f"image {index + 1}'s placeholder run [{ref.offset}, "
                f"{ref.offset + ref.length}) does not hold {ref.length} image tokens "
                f"({image_token_id})",
            )
        collapsed.extend(ids[cursor : ref.offset])
        collapsed.append(image_token_id)
        cursor = ref.offset + ref.length
    collapsed.extend(ids[cursor:])
    if collapsed.count(image_token_id) != len(request.media):
        raise RequestValidationError(
            "messages",
            f"the prompt holds image tokens ({image_token_id}) outside its images' "
            "placeholder runs",
        )
    return collapsed


def prompt_patch(ours: list[int], theirs: list[int]) -> dict[str, Any]:
    """How TensorRT-LLM's expanded prompt `theirs` differs from our `ours`, compactly for the
    decode side: the differing segments when both are as long (only the image runs differ),
    else the whole prompt."""
    if len(ours) != len(theirs):
        return {"prompt_token_ids": list(theirs)}
    segments: list[list[Any]] = []
    start: int | None = None
    for position, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b and start is None:
            start = position
        elif a == b and start is not None:
            segments.append([start, list(theirs[start:position])])
            start = None
    if start is not None:
        segments.append([start, list(theirs[start:])])
    return {"prompt_segments": segments}


def apply_patch(ours: list[int], patch: dict[str, Any]) -> list[int]:
    """The context phase's expanded prompt from ours and `prompt_patch`'s answer."""
    if "prompt_token_ids" in patch:
        return [int(t) for t in patch["prompt_token_ids"]]
    ids = list(ours)
    for start, segment in patch.get("prompt_segments", []):
        if start < 0 or start + len(segment) > len(ids):
            raise RuntimeError("the prefill worker's prompt segment lies outside the prompt")
        ids[start : start + len(segment)] = [int(t) for t in segment]
    return ids

"""The image side of a vision-language model on the torch engine: checking a request's
placeholder runs, turning fetched payloads into model inputs (a worker thread), and running
the vision encoder when a step first needs an image's features (the stepping thread).

Images are decoded with Pillow and preprocessed by the model folder's own transformers image
processor (the one `AutoProcessor` builds, so pixel values equal transformers'); a
precomputed embedding is checked against the model (dtype, [placeholder tokens, hidden]).
Features are kept on the sequence (`SeqMedia`) for its life: a preempted sequence recomputes
its KV from them, and chunked prefill takes the rows of the positions in each chunk
(`model_runner.build_plan`).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import torch

from contract.messages import GenerateRequest, MediaRef
from mpi_workers.engine.sequence import SeqMedia, Sequence
from mpi_workers.engine.streaming import RequestValidationError
from mpi_workers.engine.torch.vision import VisionConfig, load_vision_encoder


class MediaInputs:
    """One engine's images: its vision encoder and image processor."""

    kinds = frozenset({"image", "embeds"})

    def __init__(
        self,
        model_dir: Path,
        config: VisionConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_image_pixels: int,
    ) -> None:
        for module in ("transformers", "PIL"):  # image decoding and preprocessing
            if importlib.util.find_spec(module) is None:
                raise RuntimeError(f"{model_dir} is a vision-language model: its images "
                                   f"need {module} (pip install 'hpcserve[vlm]')")  # fmt: skip
        self.model_dir = model_dir
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_image_pixels = max_image_pixels
        self.encoder = load_vision_encoder(model_dir, config, device, dtype)
        self._image_processor: Any = None
        self._processor_lock = threading.Lock()

    def validate(self, request: GenerateRequest) -> None:
        """Each image's placeholder run (ValueError naming "messages")."""
        previous_end = 0
        for index, ref in enumerate(request.media):
            where = f"image {index + 1}"
            if ref.kind not in self.kinds:
                raise RequestValidationError("messages", f"{where}: kind {ref.kind!r} not taken")
            if ref.offset < previous_end or ref.offset + ref.length > len(request.token_ids):
                raise RequestValidationError(
                    "messages", f"{where}: placeholder run outside the prompt or overlapping"
                )
            previous_end = ref.offset + ref.length
            run = request.token_ids[ref.offset : previous_end]
            if any(token != self.config.image_token_id for token in run):
                raise RequestValidationError(
                    "messages", f"{where}: its positions do not all hold the image token"
                )
            if ref.kind == "image" and ref.length != self.config.tokens_per_image:
                raise RequestValidationError(
                    "messages", f"{where}: {ref.length} placeholder tokens, the model "
                    f"takes {self.config.tokens_per_image} per image",
                )  # fmt: skip

    def prepare(self, request: GenerateRequest, payloads: list[bytes]) -> list[SeqMedia]:
        """Decode + preprocess each image (the model folder's transformers image processor)
        or check each embedding (dtype, [length, hidden]); runs in a worker thread."""
        if len(payloads) != len(request.media):
            raise RequestValidationError(
                "messages", f"{len(payloads)} payloads for {len(request.media)} images"
            )
        prepared = []
        for index, (ref, payload) in enumerate(zip(request.media, payloads, strict=True)):
            item = SeqMedia(ref.offset, ref.length, ref.content_hash)
            if ref.kind == "image":
                item.pixels = self._image_pixels(index, payload)
            else:
                item.features = self._embeds(index, ref, payload)
            prepared.append(item)
        return prepared

    def _image_pixels(self, index: int, payload: bytes) -> torch.Tensor:
        from io import BytesIO

        from PIL import Image

        where = f"image {index + 1}"
        try:
            with Image.open(BytesIO(payload)) as image:
                pixels = image.width * image.height
                if pixels > self.max_image_pixels:
                    raise RequestValidationError(
                        "messages", f"{where}: {image.width}x{image.height} exceeds "
                        f"{self.max_image_pixels} pixels",
                    )  # fmt: skip
                image.load()
                decoded = image.copy()
        except RequestValidationError:
            raise
        except Exception as exc:  # PIL raises many kinds for a broken file
            raise RequestValidationError(
                "messages", f"{where} could not be decoded: {type(exc).__name__}: {exc}"
            ) from None
        values = self.image_processor()(images=[decoded], return_tensors="pt")["pixel_values"]
        want = (1, self.config.num_channels, self.config.image_size, self.config.image_size)
        if tuple(values.shape) != want:
            raise RequestValidationError(
                "messages", f"{where}: preprocessed to {list(values.shape)}, the tower takes "
                f"{list(want)}",
            )  # fmt: skip
        return values

    def _embeds(self, index: int, ref: MediaRef, payload: bytes) -> torch.Tensor:
        where = f"image {index + 1} (embeddings)"
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        dtype = dtypes.get(ref.dtype or "")
        if dtype is None:
            raise RequestValidationError("messages", f"{where}: dtype {ref.dtype!r}: one of "
                                         f"{sorted(dtypes)}")  # fmt: skip
        want = [ref.length, self.config.text_hidden_size]
        if ref.shape != want:
            raise RequestValidationError(
                "messages", f"{where}: shape {ref.shape}, the model takes {want} "
                "([placeholder tokens, hidden size])",
            )  # fmt: skip
        if len(payload) != want[0] * want[1] * dtype.itemsize:
            raise RequestValidationError(
                "messages", f"{where}: {len(payload)} bytes do not hold a {ref.dtype} {want}"
            )
        return torch.frombuffer(bytearray(payload), dtype=dtype).view(*want)

    def image_processor(self) -> Any:
        """The model folder's image processor, loaded once: the one transformers'
        AutoProcessor builds, so pixel values equal the reference's (lazy: transformers is
        heavy, and text models never need it)."""
        with self._processor_lock:
            if self._image_processor is None:
                from transformers import AutoImageProcessor, AutoProcessor

                try:
                    processor = AutoProcessor.from_pretrained(str(self.model_dir))
                    self._image_processor = processor.image_processor
                except (OSError, ValueError, AttributeError):
                    self._image_processor = AutoImageProcessor.from_pretrained(
                        str(self.model_dir)
                    )
            return self._image_processor

    def encode(self, seqs: list[Sequence], num_tokens: list[int]) -> None:
        """Stepping thread: features of the images a step's chunks touch and that have
        none yet (one encoder call for all of them); embeddings onto the device."""
        todo: list[SeqMedia] = []
        for seq, n in zip(seqs, num_tokens, strict=True):
            lo, hi = seq.num_computed, seq.num_computed + n
            for media in seq.media:
                if media.offset >= hi or media.end <= lo:
                    continue
                if media.features is None:
                    if media.pixels is None:
                        raise RuntimeError(f"{seq.request_id}: image without its payload")
                    todo.append(media)
                elif media.features.device != self.device or media.features.dtype != self.dtype:
                    media.features = media.features.to(self.device, self.dtype)
        if not todo:
            return
        pixels = torch.cat([media.pixels for media in todo]).to(self.device)
        features = self.encoder.encode(pixels)
        for media, rows in zip(todo, features, strict=True):
            media.features = rows
            media.pixels = None  # the features stand for the image from now on

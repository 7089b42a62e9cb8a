"""Media intake: an `image_url` part's URL → the payload a worker will fetch (`MediaItem`).

Where an image may come from (`multimodal` config): a `data:image/...;base64,` URL always;
`http(s)://` only with `allow_remote` (streamed with a size cap, a timeout and a content-type
check); a local file (`file://` or a plain path) only under `allowed_local_media_path`, after
resolving links and `..` (a path leading out of the folder is refused).

What the frontend does with it, and no more (it is the one CPU every request shares):
- an image: Pillow reads the header only (format, width × height against
  `max_image_pixels`); the payload is the file's bytes as sent, the worker decodes them;
- a precomputed embedding (a name ending in .pt, .pth, .bin or .safetensors): loaded with
  `torch.load(weights_only=True)` (a pickle that would run code is refused, nothing of it
  runs) or safetensors, checked against the model ([tokens, hidden] or [1, tokens, hidden],
  a floating dtype); the payload is the tensor's raw row-major bytes.
Decoding base64, reading headers, loading tensors and hashing run in a thread, off the event
loop. Every refusal is a 400 whose `param` names the part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp

from contract.config import MultimodalConfig
from contract.media import content_hash
from contract.messages import MediaKind
from contract.vlm import VlmInfo
from frontend import errors

EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# content types an embedding file may come with over http(s)
EMBEDDING_CONTENT_TYPES = frozenset(
    {
        "application/octet-stream",
        "binary/octet-stream",
        "application/x-pytorch",
        "application/x-safetensors",
        "application/zip",
        "application/x-zip-compressed",
    }
)
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)
_IN_THREAD_BYTES = 64 * 1024  # smaller base64 payloads are decoded inline (cheaper than a hop)
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class MediaItem:
    """One image part, loaded and checked: what the media store keeps and the MediaRef says."""

    kind: MediaKind
    payload: bytes
    content_hash: int
    length: int  # placeholder tokens (= feature rows)
    width: int | None = None  # image: from the header
    height: int | None = None
    dtype: str | None = None  # embeds
    shape: tuple[int, int] | None = None


def is_embedding_name(path: str) -> bool:
    return path.lower().endswith(EMBEDDING_SUFFIXES)


def kind_of(url: str) -> MediaKind:
    """What an `image_url` names: a precomputed embedding (by its file name) or an image."""
    if url[:5].lower() == "data:":
        return "image"
    path = urlparse(url).path if url[:5].lower() in ("http:", "https", "file:") else url
    return "embeds" if is_embedding_name(path) else "image"


class MediaIntake:
    """Resolves and checks image parts for one model under one `multimodal` config."""

    def __init__(self, config: MultimodalConfig, vlm: VlmInfo) -> None:
        self.config = config
        self.vlm = vlm
        self._local_root: Path | None = None
        if config.allowed_local_media_path is not None:
            self._local_root = Path(os.path.realpath(config.allowed_local_media_path))
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def load(self, url: str, param: str) -> MediaItem:
        """The checked payload of one `image_url` part; a 400 naming `param` if refused."""
        scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
        if scheme == "data":
            return await self._from_data_url(url, param)
        if scheme in ("http", "https"):
            return await self._from_remote(url, param)
        if scheme == "file" or not scheme:
            return await self._from_local(url, param)
        raise errors.bad_request(
            f"{param}: unsupported URL scheme {scheme!r}: use a data:image/...;base64, URL"
            + (", http(s)://" if self.config.allow_remote else "")
            + (", or a local file" if self._local_root is not None else ""),
            param=param,
        )

    # ----- sources -------------------------------------------------------------------------
    async def _from_data_url(self, url: str, param: str) -> MediaItem:
        match = _DATA_URL.match(url[:256])
        if match is None:
            raise errors.bad_request(
                f"{param}: a data URL must look like data:image/png;base64,<data>", param=param
            )
        mime = (match.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise errors.bad_request(
                f"{param}: the data URL's media type is {mime or 'missing'!r}, not image/*",
                param=param,
            )
        encoded = url[match.end() :]
        limit = self.config.max_media_bytes
        if len(encoded) // 4 * 3 > limit + 3:
            raise self._too_large(param, f"about {len(encoded) // 4 * 3}")
        if len(encoded) < _IN_THREAD_BYTES:
            return self._image_item(_b64decode(encoded, param), param)
        return await asyncio.to_thread(lambda: self._image_item(_b64decode(encoded, param), param))

    async def _from_remote(self, url: str, param: str) -> MediaItem:
        if not self.config.allow_remote:
            raise errors.bad_request(
                f"{param}: http(s) image URLs are disabled on this server "
                "(multimodal.allow_remote); send the image as a data:image/...;base64, URL",
                param=param,
            )
        embedding = is_embedding_name(urlparse(url).path)
        data = await self._download(url, param, embedding)
        if embedding:
            return await asyncio.to_thread(self._embedding_item, data, urlparse(url).path, param)
        return await asyncio.to_thread(self._image_item, data, param)

    async def _download(self, url: str, param: str, embedding: bool) -> bytes:
        limit = self.config.max_media_bytes
        timeout_s = self.config.fetch_timeout_s
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.get(url, allow_redirects=True) as response:
                    if response.status != 200:
                        raise errors.bad_request(
                            f"{param}: fetching the URL answered HTTP {response.status}",
                            param=param,
                        )
                    _check_content_type(response.content_type, embedding, param)
                    if response.content_length is not None and response.content_length > limit:
                        raise self._too_large(param, str(response.content_length))
                    parts: list[bytes] = []
                    size = 0
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        size += len(chunk)
                        if size > limit:
                            raise self._too_large(param, f"more than {limit}")
                        parts.append(chunk)
                    return b"".join(parts)
        except TimeoutError:
            raise errors.bad_request(
                f"{param}: the URL did not download within {timeout_s:g} s "
                "(multimodal.fetch_timeout_s)",
                param=param,
            ) from None
        except aiohttp.ClientError as exc:
            raise errors.bad_request(
                f"{param}: the URL could not be fetched: {type(exc).__name__}: {exc}",
                param=param,
            ) from None

    async def _from_local(self, url: str, param: str) -> MediaItem:
        root = self._local_root
        if root is None:
            raise errors.bad_request(
                f"{param}: local files are not allowed on this server "
                "(multimodal.allowed_local_media_path is not set)",
                param=param,
            )
        raw = unquote(urlparse(url).path) if url.lower().startswith("file:") else url
        embedding = is_embedding_name(raw)

        def read() -> MediaItem:
            path = Path(os.path.realpath(root / raw))  # an absolute `raw` replaces root
            if not path.is_relative_to(root):
                raise errors.bad_request(
                    f"{param}: the file is outside the allowed media folder "
                    "(multimodal.allowed_local_media_path)",
                    param=param,
                )
            if not path.is_file():
                raise errors.bad_request(f"{param}: no such file: {raw}", param=param)
            if path.stat().st_size > self.config.max_media_bytes:
                raise self._too_large(param, str(path.stat().st_size))
            data = path.read_bytes()
            if embedding:
                return self._embedding_item(data, raw, param)
            return self._image_item(data, param)

        return await asyncio.to_thread(read)

    # ----- checks (run in a thread) --------------------------------------------------------
    def _image_item(self, data: bytes, param: str) -> MediaItem:
        """Header only: format and size; the worker decodes the pixels."""
        from PIL import Image, UnidentifiedImageError

        if len(data) > self.config.max_media_bytes:
            raise self._too_large(param, str(len(data)))
        try:
            with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header
                width, height = image.size
        except Image.DecompressionBombError:
            raise self._too_many_pixels(param, None) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise errors.bad_request(
                f"{param}: not an image Pillow can read ({type(exc).__name__})", param=param
            ) from None
        if width * height > self.config.max_image_pixels:
            raise self._too_many_pixels(param, (width, height))
        return MediaItem(
            kind="image",
            payload=data,
            content_hash=content_hash(data),
            length=self.vlm.tokens_per_image,
            width=width,
            height=height,
        )

    def _embedding_item(self, data: bytes, name: str, param: str) -> MediaItem:
        """A precomputed embedding: one floating tensor of [tokens, hidden]."""
        if len(data) > self.config.max_media_bytes:
            raise self._too_large(param, str(len(data)))
        tensor = _load_tensor(data, name.lower().endswith(".safetensors"), param)
        import torch

        if tensor.dim() == 3 and tensor.shape[0] == 1:
            tensor = tensor[0]
        tokens, hidden = self.vlm.tokens_per_image, self.vlm.hidden_size
        if tensor.dim() != 2:
            raise errors.bad_request(
                f"{param}: the embedding has shape {list(tensor.shape)}; expected "
                f"[{tokens}, {hidden}] (or [1, {tokens}, {hidden}])",
                param=param,
            )
        if not tensor.is_floating_point():
            raise errors.bad_request(
                f"{param}: the embedding's dtype is {str(tensor.dtype).removeprefix('torch.')}; "
                "expected a floating dtype (float32, float16, bfloat16)",
                param=param,
            )
        if tensor.shape[1] != hidden:
            raise errors.bad_request(
                f"{param}: the embedding's rows are {tensor.shape[1]} wide; this model's "
                f"hidden size is {hidden}",
                param=param,
            )
        if tensor.shape[0] != tokens:
            raise errors.bad_request(
                f"{param}: the embedding has {tensor.shape[0]} rows; this model takes "
                f"{tokens} per image",
                param=param,
            )
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:  # float64 and the like: the model's inputs are 32 bits
            tensor, dtype = tensor.to(torch.float32), "float32"
        payload = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        return MediaItem(
            kind="embeds",
            payload=payload,
            content_hash=content_hash(payload),
            length=tokens,
            dtype=dtype,
            shape=(tokens, hidden),
        )

    # ----- errors --------------------------------------------------------------------------
    def _too_large(self, param: str, size: str) -> errors.OpenAIError:
        return errors.bad_request(
            f"{param}: the file is {size} bytes; at most {self.config.max_media_bytes} "
            "(multimodal.max_media_bytes)",
            param=param,
        )

    def _too_many_pixels(self, param: str, size: tuple[int, int] | None) -> errors.OpenAIError:
        what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "too many pixels"
        return errors.bad_request(
            f"{param}: the image has {what}; at most {self.config.max_image_pixels} "
            "(multimodal.max_image_pixels)",
            param=param,
        )


def _b64decode(encoded: str, param: str) -> bytes:
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise errors.bad_request(
            f"{param}: the data URL's payload is not valid base64", param=param
        ) from None


def _check_content_type(content_type: str, embedding: bool, param: str) -> None:
    kind = (content_type or "").lower()
    if embedding:
        if kind and kind not in EMBEDDING_CONTENT_TYPES:
            raise errors.bad_request(
                f"{param}: the server sent content-type {kind!r} for an embedding file; "
                "expected application/octet-stream",
                param=param,
            )
    elif not kind.startswith("image/"):
        raise errors.bad_request(
            f"{param}: the server sent content-type {kind or 'none'!r}, not image/*",
            param=param,
        )


def _load_tensor(data: bytes, safetensors_file: bool, param: str) -> Any:
    """The one tensor in an embedding file, loaded without running any code it holds."""
    import torch

    if safetensors_file:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise errors.bad_request(
                f"{param}: not a readable safetensors file ({exc})", param=param
            ) from None
    else:
        try:
            loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # weights_only refuses anything but tensors and containers
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise errors.bad_request(
                f"{param}: not a plain tensor file: torch.load(weights_only=True) refused "
                f"it ({reason})",
                param=param,
            ) from None
        if isinstance(loaded, torch.Tensor):
            return loaded
        tensors = loaded if isinstance(loaded, dict) else {}
    values = [value for value in tensors.values() if isinstance(value, torch.Tensor)]
    if len(values) != 1 or len(values) != len(tensors):
        raise errors.bad_request(
            f"{param}: the embedding file must hold exactly one tensor", param=param
        )
    return values[0]

"""Text ↔ token ids on the frontend: tokenizer, chat template, incremental detokenizer, stops.

Workers see only token ids, so everything textual happens here: the chat template turns
messages into a prompt, the incremental detokenizer turns streamed ids into text without ever
emitting half a UTF-8 character, and the stop matcher cuts the text at a stop string while
holding back text that might still become one.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from frontend.chat_templates import Renderer, known_renderer

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
# vLLM's choice: decode the last few prompt tokens with the output so leading spaces and
# merges come out as they would in a full decode.
_INITIAL_CONTEXT_TOKENS = 5
_MAX_CACHED_PIECE = 4096  # characters; longer pieces (big user messages) are not cached
_MAX_CACHED_WORD = 64  # characters; a longer pre-token (a digit or space run, a blob) is not
_WORD_CACHE_SIZE = 65536  # pre-tokens whose ids are kept (~10 MB at most)
_UTF8_DECODER = codecs.getincrementaldecoder("utf-8")  # looked up once, one made per request
# GPT-2's pre-tokenizer split (tokenizers' ByteLevel with use_regex) for ASCII text: \p{L}
# and \p{N} as their ASCII members, \s as Oniguruma (the tokenizer's regex engine) reads it
# (Python's \s also takes \x1c-\x1f). Every ASCII character falls in one alternative.
_SPACE = r"\t\n\x0b\x0c\r "
_ASCII_WORDS = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_SPACE}A-Za-z0-9]+"
    rf"|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"
)


class ChatTemplateError(ValueError):
    """The model's chat template rejected the messages (raise_exception in the template);
    `param`: the request field to name."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int)]
    return []


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-character → byte table (the inverse of bytes_to_unicode)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


# ASCII → GPT-2's byte-level alphabet, as str.translate takes it: a printable character
# stands for itself, a space is "Ġ", a control character another Latin letter
_BYTE_LEVEL = {
    byte: char for char, byte in _byte_level_decoder().items() if byte < 0x80 and chr(byte) != char
}


def _reads_variable(source: str, name: str) -> bool:
    """Whether the jinja template `source` reads the context variable `name`."""
    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    return name in meta.find_undeclared_variables(parsed)


class TextTokenizer:
    """A HF model folder's tokenizer, chat template and end-of-sequence tokens."""

    def __init__(self, model_dir: str | Path, chat_template: Path | None = None) -> None:
        """`chat_template`: a .jinja file used instead of the model's own template."""
        self.model_dir = Path(model_dir)
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer_config = _read_json(self.model_dir / "tokenizer_config.json")
        model_config = _read_json(self.model_dir / "config.json")
        generation_config = _read_json(self.model_dir / "generation_config.json")

        self.bos_token = _token_text(tokenizer_config.get("bos_token"))
        self.eos_token = _token_text(tokenizer_config.get("eos_token"))
        eos_ids = _as_ids(model_config.get("eos_token_id"))
        eos_ids += _as_ids(generation_config.get("eos_token_id"))
        if self.eos_token is not None:
            eos_id = self._tokenizer.token_to_id(self.eos_token)
            if eos_id is not None:
                eos_ids.append(eos_id)
        self.eos_token_ids: list[int] = sorted(set(eos_ids))
        self.special_token_ids: frozenset[int] = frozenset(
            token_id
            for token_id, token in self._tokenizer.get_added_tokens_decoder().items()
            if getattr(token, "special", False)
        )
        self._special_split = self._special_splitter()
        self._ascii_words = self._plain_byte_level_bpe()
        self._bpe = self._tokenizer.model  # the BPE model alone, for one pre-token's ids
        self._word_ids: dict[str, tuple[int, ...]] = {}  # ASCII pre-token → its ids
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.max_model_len: int | None = model_config.get("max_position_embeddings")
        self._byte_level = self._uses_byte_level()
        self._kept: dict[int, str] = {}  # special tokens generated text keeps (keep_in_text)
        self._token_bytes_table = self._token_bytes_of_vocabulary()
        if chat_template is not None:
            source: str | None = chat_template.read_text()
        else:
            source = self._chat_template_source(tokenizer_config)
        self._chat_template = self._compile_chat_template(source) if source else None
        # whether the template writes the request's `tools` and an assistant's tool_calls:
        # if not, tools would never reach the model (frontend.tool_calling refuses them)
        self.template_renders_tools = bool(source) and _reads_variable(source, "tools")
        self.template_renders_tool_calls = bool(source) and "tool_calls" in (source or "")
        # a known template is rendered without jinja (frontend.chat_templates)
        self._fast_render: Renderer | None = known_renderer(source) if source else None
        # the template's globals, copied once: `render` copies them into every context
        self._template_globals = dict(self._chat_template.globals) if self._chat_template else {}

    def _special_splitter(self) -> re.Pattern[str] | None:
        """A regex that splits text at added tokens, when encoding the pieces one by one is
        exactly the same as encoding the whole (no lstrip/rstrip/single_word tokens)."""
        added = self._tokenizer.get_added_tokens_decoder().values()
        if not added or any(
            token.lstrip or token.rstrip or token.single_word or token.normalized for token in added
        ):
            return None
        contents = sorted((token.content for token in added), key=len, reverse=True)
        self._added_ids = {
            token.content: self._tokenizer.token_to_id(token.content) for token in added
        }
        return re.compile("(" + "|".join(re.escape(content) for content in contents) + ")")

    def _plain_byte_level_bpe(self) -> bool:
        """Whether text is tokenized as GPT-2's: no normalizer, the ByteLevel pre-tokenizer's
        own regex and no prefix space, BPE without dropout. Then an ASCII text's ids are its
        pre-tokens' ids one after another (BPE merges never cross a pre-token), and
        `_encode_text` may split it itself and keep each pre-token's ids."""
        try:
            spec = json.loads(self._tokenizer.to_str())
        except Exception:  # a tokenizer that cannot describe itself: the library's way only
            return False
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        return (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("use_regex") is True
            and pre.get("add_prefix_space") is False
            and model.get("type") == "BPE"
            and model.get("dropout") is None
        )

    @lru_cache(maxsize=4096)  # noqa: B019 - one tokenizer per process, lives as long
    def _encode_piece(self, text: str) -> tuple[int, ...]:
        return tuple(self._encode_text(text))

    def _encode_text(self, text: str) -> list[int]:
        """A text without added tokens: ASCII split into pre-tokens here (cached ids each:
        the library's encode of a new 70-character question was ~24 µs, 17 of them its
        pre-tokenizer's regex), anything else by the library."""
        if self._ascii_words and text.isascii():
            ids: list[int] = []
            known = self._word_ids.get
            for word in _ASCII_WORDS.findall(text):
                word_ids = known(word)
                if word_ids is None:
                    word_ids = self._encode_new_word(word)
                ids += word_ids
            return ids
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_new_word(self, word: str) -> tuple[int, ...]:
        """One ASCII pre-token's ids from the BPE model itself, in its byte-level alphabet:
        ~1.7 µs against ~4-6 µs for the library's `encode` (which splits it again and
        builds an Encoding). Kept in `_word_ids` (oldest out first) unless it is long."""
        word_ids = tuple(token.id for token in self._bpe.tokenize(word.translate(_BYTE_LEVEL)))
        if len(word) <= _MAX_CACHED_WORD:
            if len(self._word_ids) >= _WORD_CACHE_SIZE:
                del self._word_ids[next(iter(self._word_ids))]
            self._word_ids[word] = word_ids
        return word_ids

    def encode_template_output(self, text: str) -> list[int]:
        """Encode a rendered chat prompt; the pieces between special tokens are cached, so
        the template's fixed parts (system prompt, role headers) are tokenized once."""
        if self._special_split is None:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for index, piece in enumerate(self._special_split.split(text)):
            if index % 2:
                ids.append(self._added_ids[piece])
            elif len(piece) > _MAX_CACHED_PIECE:
                ids.extend(self._encode_text(piece))
            elif piece:
                ids.extend(self._encode_piece(piece))
        return ids

    def _uses_byte_level(self) -> bool:
        try:
            return "ByteLevel" in type(self._tokenizer.decoder).__name__
        except Exception:
            return False

    def _chat_template_source(self, tokenizer_config: dict[str, Any]) -> str | None:
        template_file = self.model_dir / "chat_template.jinja"
        if template_file.is_file():
            return template_file.read_text()
        configured = tokenizer_config.get("chat_template")
        if isinstance(configured, str):
            return configured
        if isinstance(configured, list):  # [{"name": "default", "template": ...}, ...]
            named = {item.get("name"): item.get("template") for item in configured}
            return named.get("default") or next(iter(named.values()), None)
        return None

    def _compile_chat_template(self, source: str) -> jinja2.Template:
        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens and self._kept and not self._kept.keys().isdisjoint(token_ids):
            return self._decode_keeping(token_ids)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def special_token_id(self, text: str) -> int | None:
        """The id of the special token `text` is (None: it is not one)."""
        token_id = self._tokenizer.token_to_id(text)
        return token_id if token_id in self.special_token_ids else None

    def keep_in_text(self, texts: Sequence[str]) -> None:
        """Let the special tokens among `texts` through to generated text, which otherwise
        skips special tokens: a tool-call parser's markers (`<|python_tag|>`,
        `[TOOL_CALLS]`) are special tokens in their models' tokenizers (vLLM decodes
        Mistral's output with special tokens for the same reason)."""
        for text in texts:
            token_id = self._tokenizer.token_to_id(text)
            if token_id is not None and token_id in self.special_token_ids:
                self._kept[token_id] = text
        if self._kept and self._token_bytes_table:
            table = list(self._token_bytes_table)
            for token_id, text in self._kept.items():
                table[token_id] = text.encode()
            self._token_bytes_table = tuple(table)

    def _decode_keeping(self, token_ids: Sequence[int]) -> str:
        """A decode that skips special tokens except the kept ones (runs between them
        decoded as usual)."""
        parts: list[str] = []
        run: list[int] = []
        for token_id in token_ids:
            kept = self._kept.get(token_id)
            if kept is None:
                run.append(token_id)
                continue
            if run:
                parts.append(self._tokenizer.decode(run, skip_special_tokens=True))
                run = []
            parts.append(kept)
        if run:
            parts.append(self._tokenizer.decode(run, skip_special_tokens=True))
        return "".join(parts)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opener; `tools`
        (OpenAI's function definitions) and `template_kwargs` (the request's extra
        variables) are passed to the template as transformers' apply_chat_template does
        (then always through jinja)."""
        if self._fast_render is not None and tools is None and not template_kwargs:
            text = self._fast_render(messages, True)
            if text is not None:
                return text
        if self._chat_template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        template = self._chat_template
        variables = {
            **self._template_globals,
            **(template_kwargs or {}),
            "messages": messages,
            "add_generation_prompt": True,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
        }
        if tools is not None:
            variables["tools"] = tools
        try:
            # Template.render, less its per-call merge of the globals (a third of its time)
            context = template.new_context(variables, shared=True)
            try:
                return template.environment.concat(template.root_render_func(context))  # type: ignore[attr-defined]
            except Exception:
                template.environment.handle_exception()
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc
        except Exception as exc:  # a request's template variable clobbered a helper the
            # template calls (`raise_exception: 1`): the request's fault, not the server's
            if not template_kwargs:
                raise
            raise ChatTemplateError(
                f"the chat template failed with these chat_template_kwargs: {exc}",
                param="chat_template_kwargs",
            ) from exc

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        # the template writes the special tokens itself
        return self.encode_template_output(self.render_chat(messages, tools, template_kwargs))

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for (its longest vocabulary
        entry; a byte-level piece covers one byte, at most one character, per symbol): a
        text of N characters is at least N / this many tokens, known without tokenizing."""
        return max((len(piece) for piece in self._tokenizer.get_vocab()), default=1) or 1

    @property
    def byte_level(self) -> bool:
        """Whether every token decodes to a fixed byte string (a ByteLevel decoder)."""
        return self._byte_level

    def token_bytes(self, token_id: int) -> bytes:
        """What `token_id` adds to a decode with skip_special_tokens (b"" for a special
        token): its exact UTF-8 bytes, even when it holds only part of a character. A
        byte-level vocabulary's are all made at start-up (`_token_bytes_table`)."""
        table = self._token_bytes_table
        if 0 <= token_id < len(table):
            return table[token_id]
        return self._make_token_bytes(token_id)

    def _make_token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_token_ids:
            return b""
        return bytes(self._make_token_piece(token_id)[1])

    def _token_bytes_of_vocabulary(self) -> tuple[bytes, ...]:
        """Every token's `token_bytes` of a byte-level vocabulary, made once at start-up
        (~0.1 s and ~2 MB for 49,152 tokens): a detokenizer meeting a token for the first
        time otherwise paid ~4 µs for it (12 of 16 tokens of a new prompt's answer at c=1:
        ~0.05-0.09 ms of the request in situ, until the cache had seen the vocabulary)."""
        if not self._byte_level:
            return ()
        return tuple(self._make_token_bytes(token_id) for token_id in range(self.vocab_size))

    @lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per process, lives as long
    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """One token as (text, its UTF-8 bytes) for logprobs; bytes are exact for byte-level
        BPE even when the token holds only part of a character."""
        return self._make_token_piece(token_id)

    def _make_token_piece(self, token_id: int) -> tuple[str, list[int]]:
        if self._byte_level and token_id not in self.special_token_ids:
            piece = self._tokenizer.id_to_token(token_id)
            if piece is not None:
                table = _byte_level_decoder()
                if all(char in table for char in piece):
                    raw = bytes(table[char] for char in piece)
                    return raw.decode("utf-8", errors="replace"), list(raw)
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode("utf-8"))


class IncrementalDetokenizer:
    """Streamed token ids → text deltas (vLLM's prefix/read offsets).

    Text that ends in U+FFFD (an incomplete UTF-8 sequence) is held back until the next
    tokens complete it; `finish()` releases whatever is left, so the concatenated deltas equal
    a full decode of all output ids.

    A byte-level BPE tokenizer (GPT-2 style, SmolLM, Llama 3, Qwen) takes a fast path: each
    token is a fixed run of UTF-8 bytes (`TextTokenizer.token_bytes`, cached), fed to an
    incremental UTF-8 decoder: no decode of a growing window per token (two tokenizer calls).
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._bytes: codecs.IncrementalDecoder | None = None
        if tokenizer.byte_level:
            self._bytes = _UTF8_DECODER(errors="replace")
            self._token_bytes = tokenizer.token_bytes
            return
        context = list(prompt_ids[-_INITIAL_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = tokenizer.decode(context) if context else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """The text that `token_ids` complete; may be "" while a character is incomplete."""
        if not token_ids:
            return ""
        if self._bytes is not None:
            token_bytes = self._token_bytes
            if len(token_ids) == 1:
                return self._bytes.decode(token_bytes(token_ids[0]))
            return self._bytes.decode(b"".join(map(token_bytes, token_ids)))
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            delta = text[len(self._prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._tokenizer.decode(
                self._ids[self._prefix_offset : self._read_offset]
            )
            return delta
        return ""

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character at the very end included)."""
        if self._bytes is not None:
            return self._bytes.decode(b"", final=True)
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        delta = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return delta


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a possible stop-string start.

    `feed` returns the text that is safe to emit now and whether a stop string was reached
    (then the text before it is returned and the stop string itself is dropped). `flush`
    releases the held-back tail when generation ends without a stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._hold = max((len(stop) for stop in self._stops), default=1) - 1
        self._buffer = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._buffer + text
        earliest = -1
        for stop in self._stops:
            index = buffer.find(stop)
            if index != -1 and (earliest == -1 or index < earliest):
                earliest = index
        if earliest != -1:
            self._buffer = ""
            self.stopped = True
            return buffer[:earliest], True
        keep = self._partial_stop_suffix(buffer)
        if keep:
            self._buffer = buffer[-keep:]
            return buffer[:-keep], False
        self._buffer = ""
        return buffer, False

    def _partial_stop_suffix(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop string."""
        for length in range(min(self._hold, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def flush(self) -> str:
        held, self._buffer = self._buffer, ""
        return "" if self.stopped else held

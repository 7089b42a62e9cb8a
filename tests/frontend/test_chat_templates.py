"""Known chat templates rendered without jinja (frontend.chat_templates) give jinja's text,
and a rendered prompt tokenized piece by piece (split at the added tokens, pieces cached)
gives the ids of tokenizing it whole."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from frontend.chat_templates import SMOLLM2_TEMPLATE, known_renderer
from frontend.tokenization import ChatTemplateError, TextTokenizer

# edges for the template (quotes, jinja syntax, special tokens in the text) and for the
# tokenizer (whitespace runs, CRLF, non-breaking and ideographic spaces, combining marks,
# emoji sequences, parts of special tokens next to whole ones)
FRAGMENTS = [
    "",
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    " \n ",
    "\u00a0",
    "\u3000",
    "\u200b",
    "hello",
    "Hello,",
    " world",
    "héllo",
    "e\u0301",
    "naïve café",
    "世界",
    "日本語のテキスト",
    "한국어",
    "Ελληνικά",
    "😀",
    "👩\u200d👩\u200d👧",
    "🎉🎉",
    "12345",
    "3.14",
    "'",
    '"',
    "\\",
    "{{ x }}",
    "{% if true %}",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_",
    "_end|>",
    "|>",
    "<",
    "system",
    "assistant\n",
    "user",
    "\x00",
    "\x7f",
    "ﬁ",
    "Ⅻ",
]
ROLES = ["system", "user", "assistant", "tool", "developer", "", "User", "😀"]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(0, 12)))


def random_conversation(rng: random.Random) -> list[dict[str, Any]]:
    return [
        {"role": rng.choice(ROLES), "content": random_text(rng)} for _ in range(rng.randrange(0, 7))
    ]


def jinja_render(
    tokenizer: TextTokenizer, source: str, messages: list[Any], add_generation_prompt: bool
) -> str:
    template = tokenizer._compile_chat_template(source)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tokenizer.bos_token or "",
                           eos_token=tokenizer.eos_token or "")  # fmt: skip


def test_the_default_models_template_is_known(tokenizer: TextTokenizer, model_dir: Path) -> None:
    assert known_renderer((model_dir / "chat_template.jinja").read_text()) is not None
    assert tokenizer._fast_render is not None
    # another system prompt, or any other change, is not the known template
    assert known_renderer(SMOLLM2_TEMPLATE.replace("SmolLM", "SmolLM3")) is None
    assert known_renderer(SMOLLM2_TEMPLATE.replace("'\n'", "'\r\n'")) is None


@pytest.mark.parametrize("source", [SMOLLM2_TEMPLATE, SMOLLM2_TEMPLATE + "\n"])
def test_smollm2_renderer_equals_jinja(tokenizer: TextTokenizer, source: str) -> None:
    render = known_renderer(source)
    assert render is not None
    rng = random.Random(14)
    template = tokenizer._compile_chat_template(source)
    for _ in range(1500):
        messages = random_conversation(rng)
        if messages and rng.random() < 0.3:
            messages[0]["role"] = "system"
        for add in (True, False):
            expected = template.render(messages=messages, add_generation_prompt=add)
            assert render(messages, add) == expected, messages


def test_render_chat_uses_the_known_renderer(
    tokenizer: TextTokenizer, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(7)
    source = (model_dir / "chat_template.jinja").read_text()
    for _ in range(200):
        messages = random_conversation(rng)
        assert tokenizer.render_chat(messages) == jinja_render(tokenizer, source, messages, True)
    # render_chat really goes through the renderer: a marked one shows up in its text
    monkeypatch.setattr(tokenizer, "_fast_render", lambda messages, add: "<rendered>")
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "<rendered>"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}, 3],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": 5, "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": None, "content": "x"}],
    ],
)
def test_what_the_renderer_cannot_be_sure_of_goes_to_jinja(
    tokenizer: TextTokenizer, messages: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    render = known_renderer(SMOLLM2_TEMPLATE)
    assert render is not None and render(messages, True) is None

    def outcome() -> str | type[BaseException]:
        try:
            return tokenizer.render_chat(messages)
        except Exception as exc:
            return type(exc)

    with_renderer = outcome()
    monkeypatch.setattr(tokenizer, "_fast_render", None)  # jinja only
    assert with_renderer == outcome()
    assert with_renderer in (ChatTemplateError, TypeError)  # none of them renders


def test_piecewise_encoding_equals_whole_encoding(tokenizer: TextTokenizer) -> None:
    """Added tokens split the text before the model's pre-tokenizer sees it, so encoding
    the pieces between them one by one (cached) is exactly encoding the whole text."""
    assert tokenizer._special_split is not None  # the piecewise path is the one tested
    rng = random.Random(18)
    for round_ in range(2):  # the second time, the pieces come from the cache
        rng.seed(18)
        for _ in range(800):
            messages = random_conversation(rng)
            text = tokenizer.render_chat(messages)
            whole = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.encode_chat(messages) == whole, (round_, text)
            # and the same for raw text (user content with special tokens in it)
            raw = random_text(rng) + random_text(rng)
            assert tokenizer.encode_template_output(raw) == tokenizer.encode(
                raw, add_special_tokens=False
            ), raw


ASCII_FRAGMENTS = [
    *(chr(code) for code in range(128)),  # every ASCII character, controls included
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''", "don't", "it's", " 's",
    "  ", "   ", " \n", "\n ", "\r\n", "\t\t", "\x0b\x0c", "\x1c\x1d\x1e\x1f", " \x1c ",
    "Hello", " world", "abc123", "123abc", "3.14159", " 42", "...", " !?", "a_b", "--x",
    "<|im_", "|>", "<|endoftext", "http://example.com/a?b=c&d=e", "x = y + 1;",
    "a" * 70, " " * 70, "7" * 70, "#" * 70,  # pre-tokens past the word cache's 64 characters
]  # fmt: skip


def test_ascii_word_split_equals_the_library(tokenizer: TextTokenizer) -> None:
    """For ASCII text the tokenizer splits pre-tokens itself (GPT-2's regex, Oniguruma's
    \\s) and keeps each one's ids: the same ids as the library's encode of the whole text,
    and the split covers the whole text."""
    from frontend.tokenization import _ASCII_WORDS

    assert tokenizer._ascii_words  # SmolLM2's tokenizer is GPT-2-like: the path is tested
    assert tokenizer._special_split is not None
    tokenizer._word_ids.clear()  # every pre-token's ids come from the BPE model first
    rng = random.Random(21)
    for count in range(4000):
        text = "".join(rng.choice(ASCII_FRAGMENTS) for _ in range(rng.randrange(1, 30)))
        if count % 50 == 0:
            text *= 4200 // len(text) + 1  # past the piece cache's 4,096 characters too
        assert "".join(_ASCII_WORDS.findall(text)) == text
        whole = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer._special_split.search(text) is None:  # pieces hold no added token
            assert tokenizer._encode_text(text) == whole, repr(text)
        assert tokenizer.encode_template_output(text) == whole, repr(text)


def test_word_cache_keeps_short_pre_tokens_only(tokenizer: TextTokenizer) -> None:
    tokenizer._word_ids.clear()
    ids = tokenizer._encode_text("x" * 100 + " hello")
    assert ids == tokenizer.encode("x" * 100 + " hello", add_special_tokens=False)
    assert list(tokenizer._word_ids) == [" hello"]  # the 100-character run is not kept


def test_word_cache_drops_its_oldest_pre_token_when_full(
    tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("frontend.tokenization._WORD_CACHE_SIZE", 3)
    tokenizer._word_ids.clear()
    text = " one two three four five"
    assert tokenizer._encode_text(text) == tokenizer.encode(text, add_special_tokens=False)
    assert list(tokenizer._word_ids) == [" three", " four", " five"]


def test_new_questions_of_known_words_equal_the_library(tokenizer: TextTokenizer) -> None:
    """A new question each time, its words mostly seen before (the c=1 new-prompt case),
    with unicode, digit and whitespace runs and added tokens mixed into the user's text."""
    rng = random.Random(33)
    ascii_words = ["the", "sky", "Blue", "why", "don't", "it's", "42", "2026", "3.5", "?!",
                   "(x)", "<|im_end|>", "<|endoftext|>", "  ", "\n\n", "\t", "a" * 70]  # fmt: skip
    all_words = [*ascii_words, "über", "naïve", "日本語", "😀"]
    for count in range(3000):
        words = all_words if count % 4 == 0 else ascii_words  # mostly the ASCII path
        question = "".join(rng.choice(("", " ", "  ", "\n")) + rng.choice(words)
                           for _ in range(rng.randrange(1, 20)))  # fmt: skip
        question += f" (question {count})"
        messages = [{"role": "user", "content": question}]
        whole = tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False)
        assert tokenizer.encode_chat(messages) == whole, repr(question)


def test_template_kwargs_reach_the_template_and_their_faults_are_the_requests(
    model_dir: Path, tmp_path: Path
) -> None:
    """`chat_template_kwargs` are the template's variables (through jinja even where a fast
    renderer exists); one that breaks a helper the template calls is a ChatTemplateError
    naming chat_template_kwargs, not a server error."""
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% if messages[0]['content'] == 'bad' %}{{ raise_exception('no') }}{% endif %}"
        "{{ messages[0]['content'] }}|{{ greeting | default('none') }}"
    )
    tokenizer = TextTokenizer(model_dir, template)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.render_chat(messages) == "hi|none"
    assert tokenizer.render_chat(messages, None, {"greeting": "hello"}) == "hi|hello"
    bad = [{"role": "user", "content": "bad"}]
    with pytest.raises(ChatTemplateError) as refused:
        tokenizer.render_chat(bad)
    assert refused.value.param == "messages"
    with pytest.raises(ChatTemplateError) as clobbered:
        tokenizer.render_chat(bad, None, {"raise_exception": 1})
    assert clobbered.value.param == "chat_template_kwargs"

"""Messages between the frontend and the workers, sent over NATS as JSON.

Token ids, not text: tokenization and detokenization happen on the frontend. Every message
carries `version` so that a mismatched frontend and worker fail loudly instead of guessing.
"""

from __future__ import annotations

import array
import base64
import sys
from typing import Annotated, Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field

# 2: KvStored carries a flat `block_hashes` list (was a dict per block). 3: SamplingParams
# has `prompt_logprobs` (and `min_tokens`, `logit_bias`), GenerateOutput `prompt_logprobs`
# (a version-2 worker would refuse the new fields of every request: the bump says why).
# 4: SamplingParams has `guided` (constrained output: response_format json_object/json_schema).
# 5: GuidedDecoding has `thinking` (a reasoning model's free thinking before the constraint).
# 6: GenerateRequest has `pooling` (an embedding instead of tokens), GenerateOutput `embedding`.
PROTOCOL_VERSION = 6

FinishReason = Literal["stop", "length", "abort", "error"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Bounds(NamedTuple):
    """The values one sampling field admits: defined once, applied by the OpenAI request
    schema (as pydantic constraints: a 400 naming the field) and again by the engine (its
    own callers skip the frontend: `validate_request`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, high] instead of [low, high]

    def constraints(self) -> dict[str, float]:
        """Keyword arguments of `pydantic.Field`."""
        found: dict[str, float] = {}
        if self.low is not None:
            found["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            found["le"] = self.high
        return found

    def admits(self, value: float) -> bool:
        """Whether `value` lies within (NaN never does)."""
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        """`must be in (0, 1]`, `must be >= 1`: the tail of an error message."""
        low, high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.low, self.high))
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"must be <= {high}"
        return f"must be in {'(' if self.low_open else '['}{low}, {high}]"


MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI allows

# The one definition of the sampling fields' ranges (OpenAI's and vLLM's documentation).
SAMPLING_BOUNDS: dict[str, Bounds] = {
    "max_tokens": Bounds(1),
    "temperature": Bounds(0.0, 2.0),
    "top_p": Bounds(0.0, 1.0, low_open=True),
    "top_k": Bounds(-1),  # -1 or 0: no top-k cut
    "min_p": Bounds(0.0, 1.0),
    "presence_penalty": Bounds(-2.0, 2.0),
    "frequency_penalty": Bounds(-2.0, 2.0),
    "repetition_penalty": Bounds(0.0, low_open=True),
    "seed": Bounds(-(2**63), 2**63 - 1),
    "logprobs": Bounds(0, MAX_LOGPROBS),
    "prompt_logprobs": Bounds(0, MAX_LOGPROBS),
    "min_tokens": Bounds(0),  # and at most max_tokens (`sampling_range_error`)
}

# logit_bias (OpenAI): token id -> a bias added to its logit before sampling.
LOGIT_BIAS_BOUNDS = Bounds(-100.0, 100.0)
MAX_LOGIT_BIAS = 300  # entries per request, OpenAI's limit


def sampling_range_error(params: SamplingParams) -> tuple[str, str] | None:
    """(field, message) of the first field of `params` outside SAMPLING_BOUNDS (or a
    min_tokens above max_tokens, a logit_bias too long or out of range), or None."""
    for name, bounds in SAMPLING_BOUNDS.items():
        value = getattr(params, name)
        if value is not None and not bounds.admits(value):
            return name, bounds.describe()
    if params.min_tokens > params.max_tokens:
        return "min_tokens", f"must be <= max_tokens ({params.max_tokens})"
    return logit_bias_error(params.logit_bias)


def logit_bias_error(bias: dict[int, float]) -> tuple[str, str] | None:
    """(field, message) when `bias` has too many entries or a bias outside
    LOGIT_BIAS_BOUNDS; else None. Its token ids: `logit_bias_vocab_error`."""
    if len(bias) > MAX_LOGIT_BIAS:
        return "logit_bias", f"at most {MAX_LOGIT_BIAS} entries, not {len(bias)}"
    for token, value in bias.items():
        if not LOGIT_BIAS_BOUNDS.admits(value):
            return "logit_bias", f"the bias of token {token} {LOGIT_BIAS_BOUNDS.describe()}"
    return None


def logit_bias_vocab_error(bias: dict[int, float], vocab_size: int) -> tuple[str, str] | None:
    """(field, message) when a token id of `bias` lies outside the vocabulary; else None
    (checked where the vocabulary is known: the frontend's tokenizer, the engine)."""
    bad = next((token for token in bias if not 0 <= token < vocab_size), None)
    if bad is None:
        return None
    return "logit_bias", f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})"


GuidedKind = Literal["json_object", "json_schema", "regex"]


class ThinkingFirst(_Message):
    """A reasoning model's thinking before a constrained answer (frontend.reasoning_parser):
    the output is free up to and including the block's end tag `close`, constrained after
    it (and the whitespace after it). `open`: the start tag the output may begin the block
    with (None: the prompt opened it, the output starts inside). A tag that is one special
    token of the model's tokenizer is named by its id (`*_token`): text cannot match it."""

    close: str = Field(min_length=1)
    open: str | None = None
    close_token: int | None = None
    open_token: int | None = None


class GuidedDecoding(_Message):
    """A constraint on the output (OpenAI's `response_format`, vLLM's `guided_json` /
    `guided_regex` / `guided_choice`): every sampled token keeps the output a prefix of a
    text the constraint accepts, and the output ends where it is complete. The grammar is
    built from these fields where tokens are sampled (`contract.guided`)."""

    kind: GuidedKind
    # json_schema: the JSON Schema as JSON text (a frontend may build it, e.g. from tools);
    # regex: the pattern (Rust regex syntax); json_object: unused (any JSON object)
    spec: str = ""
    # How many of the request's last `token_ids` are output already generated under this
    # constraint (a migrated request's continuation): the sampler's matcher consumes them
    # before it constrains the next token.
    generated: int = Field(default=0, ge=0)
    thinking: ThinkingFirst | None = None


class SamplingParams(_Message):
    """Per-request decoding settings; ranges in SAMPLING_BOUNDS (the engine checks them)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: chosen token only; n: also the top n
    # The prompt's own tokens' logprobs (each given the tokens before it), for `echo` with
    # logprobs: None: none; k: each prompt token's logprob and the top k at its position.
    # An engine computing them does not read its prefix cache for the request (cached
    # positions have no hidden states to take logits from).
    prompt_logprobs: int | None = None
    # EOS and stop_token_ids cannot end the output before this many tokens (vLLM's field)
    min_tokens: int = 0
    # token id -> bias added to its logit before sampling (OpenAI's field; ids as ints)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    # constrained output; None: free text
    guided: GuidedDecoding | None = None


MediaKind = Literal["image", "embeds"]


class MediaRef(_Message):
    """One image of a request: where its placeholder tokens sit in `token_ids` and where the
    worker fetches its payload (`contract.media`: the frontend's media side channel).

    kind "image": the image file's bytes as the client sent them (PNG, JPEG, ...); the worker
    decodes and preprocesses it and runs the vision encoder. kind "embeds": a precomputed
    embedding, raw row-major bytes of a `dtype` tensor of `shape` [length, hidden], used
    exactly where the encoder's output would be.
    """

    kind: MediaKind
    offset: int = Field(ge=0)  # index in token_ids of the first placeholder token
    length: int = Field(ge=1)  # placeholder tokens (= rows of features)
    content_hash: int  # contract.media.content_hash of the payload (KV block hashes use it)
    subject: str  # the frontend's media subject
    media_id: str
    nbytes: int = Field(ge=1)
    dtype: str | None = None  # embeds: "float32" | "float16" | "bfloat16"
    shape: list[int] | None = None  # embeds: [length, hidden]
    width: int | None = None  # image: its size as the frontend read it from the header
    height: int | None = None


# How an embedding pools the prompt's final hidden states (vLLM's PoolerConfig names):
# LAST: the last token's (e5-mistral, gte-Qwen2, Qwen3-Embedding), MEAN: their average.
PoolingType = Literal["LAST", "MEAN"]


class PoolingParams(_Message):
    """Asks for the prompt's embedding instead of generated tokens: its final-norm hidden
    states pooled (`pooling_type`), cut to the first `dimensions` components (Matryoshka;
    None: all), then scaled to unit length if `normalize` (vLLM's order). The worker answers
    with one chunk: finish_reason "stop", no tokens, `embedding` set."""

    pooling_type: PoolingType = "LAST"
    normalize: bool = True
    dimensions: int | None = Field(default=None, ge=1)


def encode_embedding(values: bytes) -> str:
    """An embedding on the wire: its little-endian float32 bytes, base64 (about a quarter of
    a JSON list of its values, and exactly OpenAI's `encoding_format: base64`)."""
    return base64.b64encode(values).decode("ascii")


def decode_embedding(text: str) -> list[float]:
    """`encode_embedding`'s text back to floats."""
    values = array.array("f", base64.b64decode(text))
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


class GenerateRequest(_Message):
    version: int = PROTOCOL_VERSION
    request_id: str  # this attempt's id (replies and aborts are matched by it)
    token_ids: list[int]
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    # The id the client sees (the response's `id`, and its X-Request-Id header): the same
    # across a request's attempts, so worker log lines can be matched to a client's request.
    client_id: str | None = None
    # Which of the client request's `n` choices this is (frontend.choices); 0 for a request of
    # one choice. A seeded choice also has its own seed (`choice_seed`); an engine whose
    # unseeded samples do not differ by themselves (the mocker's pseudo tokens) mixes it in.
    choice_index: int = Field(default=0, ge=0)
    # The sender reads batches: its reply subject is `<inbox>.<request_id>`, and the chunks a
    # worker step produced for several of its requests may come as one JSON array of chunks
    # on `<inbox>.batch` (`batch_subject`): one NATS message per step, not per request.
    batch_replies: bool = False
    # Images (or their precomputed embeddings), in prompt order; their placeholder runs in
    # token_ids never overlap.
    media: list[MediaRef] = Field(default_factory=list)
    # Set: an embedding request (model.task embed): the prompt is computed once, nothing is
    # sampled, and the answer is the pooled vector (`sampling` is ignored).
    pooling: PoolingParams | None = None


def choice_seed(seed: int, index: int) -> int:
    """The seed choice `index` of a request seeded with `seed` samples with: seed + index
    (vLLM's convention: the choices differ from each other, each is reproducible, choice 0
    is the request's own sample), wrapped around within SAMPLING_BOUNDS' signed 64 bits so
    that the largest seed's n > 1 choices stay valid seeds."""
    return (seed + index + 2**63) % 2**64 - 2**63


def request_json(request: GenerateRequest) -> bytes:
    """`request` as JSON for the wire, as `model_dump_json` writes it, but by orjson from the
    models' own attribute dicts (a third of the time: the frontend sends one per request).
    Media (nested models) go through pydantic's serializer. logit_bias's int keys become
    strings, as JSON (and pydantic) write them (an option that costs ~0.3 µs: only then)."""
    if request.media or request.pooling is not None:
        return request.model_dump_json().encode()
    fields = dict(request.__dict__)
    fields["sampling"] = sampling = request.sampling.__dict__
    guided = request.sampling.guided
    if guided is not None:  # the one nested model (and its thinking fence): as dicts
        fields["sampling"] = {**sampling, "guided": guided.__dict__}
        if guided.thinking is not None:
            fields["sampling"]["guided"] = {**guided.__dict__, "thinking": guided.thinking.__dict__}
    keys = orjson.OPT_NON_STR_KEYS if request.sampling.logit_bias else 0
    return orjson.dumps(fields, option=keys)


class TopLogprob(_Message):
    token_id: int
    logprob: float


class TokenLogprob(_Message):
    token_id: int
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class GenerateOutput(_Message):
    """One streamed chunk: the tokens produced since the previous chunk.

    The last chunk has `finish_reason` set; on failure it is "error" and `error` says why
    (`error_param` names the offending request field when the request itself was bad).

    `worker_id` is set on a chunk when another worker takes the stream over (prefill_first
    disaggregation: the decode worker announces itself as it accepts the hand-off); from
    then on that worker serves the request: aborts go to it and its leaving fails it.
    """

    version: int = PROTOCOL_VERSION
    request_id: str
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    # With `sampling.prompt_logprobs`: on the request's first chunk, one entry per prompt
    # token from the second on (entry i: token i + 1 given tokens 0..i; the first prompt
    # token has none). None on every other chunk.
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    error_param: str | None = None
    worker_id: str | None = None
    # An embedding request's answer (`PoolingParams`), on its one chunk: `encode_embedding`.
    embedding: str | None = None


BATCH_SUFFIX = "batch"  # request ids are hex: no request's reply subject ends so


def batch_subject(reply: str) -> str:
    """Where the batched chunks for the requests replying to `reply`'s inbox go."""
    return f"{reply.rsplit('.', 1)[0]}.{BATCH_SUFFIX}"


def outputs_json(outputs: list[GenerateOutput]) -> bytes:
    """A batch of chunks (for one inbox) as a JSON array."""
    return b"[" + b",".join(output_json(output) for output in outputs) + b"]"


def output_json(output: GenerateOutput) -> bytes:
    """`output` as JSON for the wire, fast: orjson, and fields at their defaults left out
    (the reader's model fills them in). A worker sends one per request per step, so
    pydantic's serializer was a good part of its CPU per token."""
    # nested models: pydantic's own serializer
    if output.logprobs is not None or output.prompt_logprobs is not None:
        return output.model_dump_json(exclude_defaults=True).encode()
    return orjson.dumps(
        output_fields(
            output.request_id, output.token_ids, output.finish_reason,
            output.num_prompt_tokens, output.num_cached_tokens, output.error,
            output.error_param, output.worker_id, output.version, output.embedding,
        )
    )  # fmt: skip


def output_fields(
    request_id: str,
    token_ids: list[int],
    finish_reason: str | None,
    num_prompt_tokens: int,
    num_cached_tokens: int,
    error: str | None,
    error_param: str | None = None,
    worker_id: str | None = None,
    version: int = PROTOCOL_VERSION,
    embedding: str | None = None,
) -> dict[str, Any]:
    """A `GenerateOutput` without logprobs as the dict `output_json` encodes, fields at their
    defaults left out (the worker's outbox encodes its chunks through this too, without a
    model per chunk)."""
    data: dict[str, Any] = {"version": version, "request_id": request_id, "token_ids": token_ids}
    if finish_reason is not None:
        data["finish_reason"] = finish_reason
    if num_prompt_tokens:
        data["num_prompt_tokens"] = num_prompt_tokens
    if num_cached_tokens:
        data["num_cached_tokens"] = num_cached_tokens
    if error is not None:
        data["error"] = error
    if error_param is not None:
        data["error_param"] = error_param
    if worker_id is not None:
        data["worker_id"] = worker_id
    if embedding is not None:
        data["embedding"] = embedding
    return data


class AbortRequest(_Message):
    version: int = PROTOCOL_VERSION
    request_id: str


class KvStored(_Message):
    """Full blocks that became reusable, in prefix order; the first one's parent is
    `parent_hash`. A flat list of hashes (every frontend process parses every worker's
    events: one dict per block was most of that parse); a block is always `block_size`
    tokens (the worker's card), as only full blocks are reusable."""

    kind: Literal["stored"] = "stored"
    parent_hash: int | None
    block_hashes: list[int]


class KvRemoved(_Message):
    kind: Literal["removed"] = "removed"
    block_hashes: list[int]


KvEvent = Annotated[KvStored | KvRemoved, Field(discriminator="kind")]


class KvEventBatch(_Message):
    """A worker's KV events since its last batch (the steps of one pass of its publisher, in
    order); `seq` counts batches per worker."""

    version: int = PROTOCOL_VERSION
    worker_id: str
    seq: int
    events: list[KvEvent]


class KvBatchOps(NamedTuple):
    """A `KvEventBatch` as plain data for the KV index's hot path: each event an
    `(stored, block_hashes)` pair (stored: True for KvStored's blocks, False for KvRemoved)."""

    worker_id: str
    seq: int
    events: list[tuple[bool, list[int]]]

    @classmethod
    def of(cls, batch: KvEventBatch) -> KvBatchOps:
        return cls(batch.worker_id, batch.seq, [
            (isinstance(e, KvStored), list(e.block_hashes))
            for e in batch.events
        ])  # fmt: skip


_BATCH_KEYS = frozenset(KvEventBatch.model_fields)
_STORED_KEYS = frozenset(KvStored.model_fields)
_REMOVED_KEYS = frozenset(KvRemoved.model_fields)
_INT = {int}  # `type(x) is int` only: a bool or a float goes to the model, which decides


def kv_batch_json(worker_id: str, seq: int, events: list[KvEvent]) -> bytes:
    """`KvEventBatch(worker_id=..., seq=..., events=...).model_dump_json()`, by orjson from
    the events' fields (a batch per pass under load: the model's serializer cost more than
    the rest of publishing it)."""
    wire: list[dict[str, Any]] = [
        {"kind": "stored", "parent_hash": event.parent_hash, "block_hashes": event.block_hashes}
        if isinstance(event, KvStored)
        else {"kind": "removed", "block_hashes": event.block_hashes}
        for event in events
    ]
    message = {"version": PROTOCOL_VERSION, "worker_id": worker_id, "seq": seq, "events": wire}
    return orjson.dumps(message)


def parse_kv_event_batch(data: bytes) -> KvBatchOps:
    """`KvEventBatch.model_validate_json(data)` as `KvBatchOps`, fast: every frontend process
    parses every worker's batches, and pydantic's model building was most of that cost.

    orjson reads the batch; one exactly in the shape workers write (no missing or extra
    field, ints as ints) becomes tuples directly, each event's hashes the list orjson made
    (its element types checked by one C-level map). Anything else goes through the pydantic
    model, so what is accepted, what it means, and the ValueError for a bad batch are the
    schema's (`KvEventBatch` stays the documented format)."""
    try:
        message = orjson.loads(data)
        if message.keys() != _BATCH_KEYS:
            raise ValueError
        worker_id, seq, version = message["worker_id"], message["seq"], message["version"]
        if type(worker_id) is not str or type(seq) is not int or type(version) is not int:
            raise ValueError
        events: list[tuple[bool, list[int]]] = []
        for event in message["events"]:
            kind = event["kind"]
            if kind == "stored" and event.keys() == _STORED_KEYS:
                parent = event["parent_hash"]
                if parent is not None and type(parent) is not int:
                    raise ValueError
                hashes = event["block_hashes"]
                if type(hashes) is not list or not set(map(type, hashes)) <= _INT:
                    raise ValueError
                events.append((True, hashes))
            elif kind == "removed" and event.keys() == _REMOVED_KEYS:
                hashes = event["block_hashes"]
                if type(hashes) is not list or not set(map(type, hashes)) <= _INT:
                    raise ValueError
                events.append((False, hashes))
            else:
                raise ValueError
        return KvBatchOps(worker_id, seq, events)
    except (ValueError, TypeError, KeyError, AttributeError):
        return KvBatchOps.of(KvEventBatch.model_validate_json(data))


class KvSnapshot(_Message):
    """Every reusable block hash of a worker, as of its event batch `seq` (index reconcile)."""

    version: int = PROTOCOL_VERSION
    worker_id: str
    seq: int
    block_hashes: list[int]


class LoadMetrics(_Message):
    version: int = PROTOCOL_VERSION
    worker_id: str = ""
    active_sequences: int = 0
    waiting_sequences: int = 0
    total_blocks: int = 0
    free_blocks: int = 0
    active_blocks: int = 0

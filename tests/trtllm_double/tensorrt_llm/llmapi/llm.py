"""TEST DOUBLE of `tensorrt_llm.llmapi.llm`: LLM (PyTorch backend) and RequestOutput.

Reproduced: the constructor signature and its kwarg check ("LLM got invalid argument: k"),
pydantic-validated `llm.args`, the MPI session choice (TLLM_SPAWN_PROXY_PROCESS=1 -> talk to
the leader started by trtllm-llmapi-launch, else a local pool), `generate_async` as a plain
method returning a RequestOutput at once, its synchronous checks (ValueError/TypeError) vs.
the executor's asynchronous ones (RequestError on iteration), context_only forcing
max_tokens=1 on the caller's SamplingParams, KV event and stats polling. What a GPU would do
is faked by the executor in `tensorrt_llm._double` (see README.md).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .._double import hashing
from .._double.engine import Engine, EngineConfig
from .._double.model_files import LightTokenizer, ModelInfo, load_model_info
from .._double.multimodal import ExpandedPrompt, expand, salted
from .._double.proxy import (
    ENV_ADDR,
    ENV_CONNECT_TIMEOUT,
    ENV_KEY,
    LeaderClient,
    spawn_proxy_requested,
)
from .._double.queues import WakeQueue
from .._double.requests import Request, RequestKind
from ..disaggregated_params import DisaggregatedParams
from ..executor.request import DEFAULT_REQUEST_PRIORITY
from ..executor.result import GenerationResult, IterationResult
from ..sampling_params import SamplingParams
from ..scheduling_params import SchedulingParams
from .llm_args import TorchLlmArgs

__all__ = ["LLM", "BaseLLM", "RequestOutput", "SamplingParams"]

logger = logging.getLogger("tensorrt_llm")
_DEFAULT_BLOCKS = 256  # KV pool size when kv_cache_config.max_tokens is None
_DEFAULT_MAX_SEQ_LEN = 4096


class RequestOutput(GenerationResult):
    """The output of one request: request_id, prompt, prompt_token_ids, outputs, finished."""

    def __init__(self) -> None:
        raise RuntimeError(
            f"{self.__class__.__name__} is designed to be instantiated using "
            f"{self.__class__.__name__}._from_generation_result by GenerationExecutor. "
            f"Users are not expected to create {self.__class__.__name__} directly."
        )

    @classmethod
    def _create(cls, prompt: str | None, **kwargs: Any) -> RequestOutput:
        inst = cls.__new__(cls)
        GenerationResult.__init__(inst, **kwargs)
        inst._prompt = prompt
        return inst

    @property
    def prompt(self) -> str | None:
        return self._prompt

    def _repr_fields(self) -> list[str]:
        return ["request_id", "prompt", "prompt_token_ids", "outputs", "finished"]


class BaseLLM:
    """The LLM API entry point (PyTorch flow)."""

    def __init__(
        self,
        model: str | Path,
        tokenizer: Any = None,
        tokenizer_mode: Literal["auto", "slow"] = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._engine: Engine | None = None
        self.mpi_session: LeaderClient | None = None
        kwargs.pop("executor_cls", None)
        valid_keys = set(TorchLlmArgs.model_fields) | {"_mpi_session", "backend"}
        try:
            for key in kwargs:
                if key not in valid_keys:
                    raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
            self.args = TorchLlmArgs.from_kwargs(
                model=model,
                tokenizer=tokenizer,
                tokenizer_mode=tokenizer_mode,
                skip_tokenizer_init=skip_tokenizer_init,
                trust_remote_code=trust_remote_code,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                revision=revision,
                tokenizer_revision=tokenizer_revision,
                **kwargs,
            )
        except Exception as exc:
            logger.error(f"Failed to parse the arguments for the LLM constructor: {exc}")
            raise
        self._info = self._load_model(Path(self.args.model))
        self._tokenizer = self._make_tokenizer()
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        # DOUBLE ONLY: the latest accepted `generate_async` input dicts and their request
        # types, so a test can see what an adapter passed (e.g. its multimodal inputs).
        self._double_inputs: collections.deque[tuple[Any, str]] = collections.deque(maxlen=64)
        self._start_mpi_session()
        try:
            self._engine = Engine(self._engine_config())
        except Exception:
            self._close_mpi_session()
            raise
        atexit.register(BaseLLM._shutdown_wrapper, weakref.ref(self))

    # --- construction helpers ------------------------------------------------------------
    @staticmethod
    def _load_model(model: Path) -> ModelInfo:
        if not (model.is_dir() and (model / "config.json").is_file()):
            raise ValueError(
                f"Failed to load model {str(model)!r}: not a local folder with config.json "
                "(the TensorRT-LLM test double does not download from the Hugging Face Hub)"
            )
        return load_model_info(model)

    def _make_tokenizer(self) -> Any:
        if self.args.skip_tokenizer_init:
            return None
        given = self.args.tokenizer
        if given is None:
            return LightTokenizer(self._info)
        if isinstance(given, str | Path):
            return LightTokenizer(load_model_info(Path(given))) if Path(given).is_dir() else None
        return given  # an already-built tokenizer object (duck-typed)

    def _world_size(self) -> int:
        args = self.args
        return args.tensor_parallel_size * args.pipeline_parallel_size * args.context_parallel_size

    def _start_mpi_session(self) -> None:
        world = self._world_size()
        if world <= 1:
            return
        args = self.args
        if not spawn_proxy_requested():
            logger.info(f"spawning {world} local workers (double: simulated)")
            return
        timeout = float(os.environ.get(ENV_CONNECT_TIMEOUT, "30"))
        addr = os.environ.get(ENV_ADDR, "")
        client = LeaderClient(addr, os.environ.get(ENV_KEY, ""), timeout)
        try:
            hello = client.hello()
            ranks, hosts = int(hello["world_size"]), list(hello.get("hosts") or [])
            if ranks != world:
                raise ValueError(
                    f"MPI world size {ranks} does not match tensor_parallel_size "
                    f"({args.tensor_parallel_size}) * pipeline_parallel_size "
                    f"({args.pipeline_parallel_size}) * context_parallel_size "
                    f"({args.context_parallel_size}) = {world}"
                )
        except Exception:
            client.shutdown()
            raise
        self.mpi_session = client
        logger.info(f"MPI session: {ranks} ranks on {','.join(hosts)}")

    def _close_mpi_session(self) -> None:
        if self.mpi_session is not None:
            self.mpi_session.shutdown()
            self.mpi_session = None

    def _engine_config(self) -> EngineConfig:
        args, info = self.args, self._info
        kv = args.kv_cache_config
        tokens_per_block = kv.tokens_per_block
        num_blocks = (
            max(kv.max_tokens // tokens_per_block, 1)
            if kv.max_tokens is not None
            else _DEFAULT_BLOCKS
        )
        ends = set(info.eos_ids)
        tokenizer_eos = getattr(self._tokenizer, "eos_token_id", None)
        if tokenizer_eos is not None:
            ends.add(tokenizer_eos)
        return EngineConfig(
            vocab_size=info.vocab_size,
            end_token_ids=frozenset(ends),
            max_seq_len=self._max_seq_len(),
            max_batch_size=args.max_batch_size or 2048,
            tokens_per_block=tokens_per_block,
            num_blocks=num_blocks,
            block_reuse=kv.enable_block_reuse,
            event_buffer_max_size=kv.event_buffer_max_size,
            iter_stats=args.enable_iter_perf_stats,
            max_stats_len=args.max_stats_len if args.max_stats_len > 0 else 1_000_000,
            cache_transceiver=args.cache_transceiver_config is not None,
            step_s=float(os.environ.get("TLLM_DOUBLE_STEP_S", "0.002")),
        )

    def _max_seq_len(self) -> int:
        return self.args.max_seq_len or self._info.max_position_embeddings or _DEFAULT_MAX_SEQ_LEN

    # --- public API ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def llm_id(self) -> str:
        if not hasattr(self, "_llm_id"):
            self._llm_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000)}"
        return self._llm_id

    def generate(
        self,
        inputs: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        kv_cache_retention_config: Any = None,
        disaggregated_params: DisaggregatedParams | Sequence[DisaggregatedParams] | None = None,
        scheduling_params: SchedulingParams | list[SchedulingParams] | None = None,
        cache_salt: str | Sequence[str] | None = None,
    ) -> RequestOutput | list[RequestOutput]:
        """Synchronous generation of one prompt or a batch of prompts."""
        del use_tqdm
        unbatched = not isinstance(inputs, list) or (bool(inputs) and isinstance(inputs[0], int))
        batch = [inputs] if unbatched else list(inputs)

        def item(value: Any, i: int) -> Any:
            return value[i] if isinstance(value, list) else value

        futures = [
            self.generate_async(
                prompt,
                sampling_params=item(sampling_params, i),
                lora_request=item(lora_request, i),
                prompt_adapter_request=item(prompt_adapter_request, i),
                kv_cache_retention_config=item(kv_cache_retention_config, i),
                disaggregated_params=item(disaggregated_params, i),
                scheduling_params=item(scheduling_params, i),
                cache_salt=item(cache_salt, i),
                streaming=False,
            )
            for i, prompt in enumerate(batch)
        ]
        for future in futures:
            future.result()
        return futures[0] if unbatched else futures

    def generate_async(
        self,
        inputs: Any,
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: DisaggregatedParams | None = None,
        trace_headers: Mapping[str, str] | None = None,
        _postproc_params: Any = None,
        scheduling_params: SchedulingParams | None = None,
        conversation_params: Any = None,
        cache_salt: str | None = None,
        priority: float = DEFAULT_REQUEST_PRIORITY,
    ) -> RequestOutput:
        """Submit one prompt; returns its RequestOutput at once (iterate/await it)."""
        del kv_cache_retention_config, trace_headers, _postproc_params, scheduling_params
        del conversation_params, priority
        engine = self._engine
        if engine is None or engine.is_shutdown():
            raise RuntimeError("LLM is shutting down")
        params = self._prepare_sampling_params(sampling_params)
        kind: RequestKind = "aggregated"
        if disaggregated_params is not None and disaggregated_params.request_type in (
            "context_only",
            "generation_only",
        ):
            kind = disaggregated_params.request_type  # type: ignore[assignment]
        if kind == "context_only":
            params.max_tokens = 1  # the real PyTorch flow does the same, on the caller's object
        _reject_unsupported(
            params, lora_request, prompt_adapter_request, disaggregated_params, self.args
        )
        prompt, token_ids, multimodal = self._prompt_tokens(inputs, params, kind)
        self._check_arguments(len(token_ids), params, is_gen_only=kind == "generation_only")
        self._double_inputs.append((inputs, kind))
        with self._ids_lock:
            request_id = next(self._ids)
        queue: WakeQueue[Any] = WakeQueue()
        result = RequestOutput._create(
            prompt,
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            streaming=streaming,
            disaggregated_params=disaggregated_params,
            executor=engine,
            queue=queue,
            tokenizer=self._tokenizer,
        )
        ignore_eos = params.ignore_eos
        end_id = -1 if ignore_eos or params.end_id is None else int(params.end_id)
        salt_id = hashing.string_id(cache_salt) if cache_salt is not None else None
        if multimodal is not None:
            salt_id = salted(salt_id, multimodal.digest)
        engine.submit(
            Request(
                request_id=request_id,
                prompt=list(token_ids),
                params=params,
                streaming=streaming,
                queue=queue,
                kind=kind,
                disagg=disaggregated_params,
                salt_id=salt_id,
                end_id=end_id,
                stop_words=[] if ignore_eos else params._get_stop_words(),
                bad_tokens=frozenset(w[0] for w in params._get_bad_words() if len(w) == 1),
                mm_digest=multimodal.digest if multimodal is not None else None,
                mm_placeholder=multimodal.placeholder if multimodal is not None else None,
            )
        )
        return result

    def _prepare_sampling_params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(
                "The sampling_params must be type SamplingParams or None, but got "
                f"{type(sampling_params)}"
            )
        if sampling_params.end_id is None:
            if self._tokenizer is None:
                raise ValueError(
                    "tokenizer is required to reset end_id if it is None, or you can explicitly "
                    "specify the end_id for sampling_params"
                )
            sampling_params._setup(self._tokenizer)
        elif (sampling_params.stop is not None and sampling_params._stop_word_ids is None) or (
            sampling_params.bad is not None and sampling_params._bad_word_ids is None
        ):
            if self._tokenizer is None:
                raise ValueError("stop/bad strings need a tokenizer (skip_tokenizer_init=True)")
            sampling_params._setup(self._tokenizer)
        if sampling_params._stream_interval is None:
            sampling_params._stream_interval = self.args.stream_interval
        sampling_params.return_perf_metrics = (
            sampling_params.return_perf_metrics or self.args.return_perf_metrics
        )
        return sampling_params

    def _prompt_tokens(
        self, inputs: Any, params: SamplingParams, kind: RequestKind
    ) -> tuple[str | None, list[int], ExpandedPrompt | None]:
        prompt: str | None = None
        if isinstance(inputs, str):
            inputs = {"prompt": inputs}
        elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            inputs = {"prompt_token_ids": inputs}
        if not isinstance(inputs, Mapping):
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        multimodal_given = (
            inputs.get("multi_modal_data") is not None
            or inputs.get("multi_modal_embeddings") is not None
        )
        if multimodal_given and kind == "generation_only":
            raise ValueError(
                "multimodal inputs on a generation_only request: the KV from the context phase "
                "already holds the images (the real LLM would re-run the vision tower for "
                "nothing); send the context phase's prompt_token_ids alone "
                "(TensorRT-LLM test double)"
            )
        if "prompt_token_ids" in inputs:
            token_ids = [int(t) for t in inputs["prompt_token_ids"]]
        elif "prompt" in inputs:
            prompt = str(inputs["prompt"])
            if self._tokenizer is None:
                raise ValueError("text prompts need a tokenizer; the LLM has skip_tokenizer_init")
            token_ids = self._tokenizer.encode(prompt, add_special_tokens=params.add_special_tokens)
        else:
            raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens :]
        multimodal = expand(inputs, token_ids, self._info) if multimodal_given else None
        if multimodal is not None:
            token_ids = multimodal.token_ids  # RequestOutput.prompt_token_ids: the expanded ids
        return prompt, token_ids, multimodal

    def _check_arguments(self, prompt_len: int, params: SamplingParams, is_gen_only: bool) -> None:
        args = self.args
        if params.n > (args.max_batch_size or 2048):
            raise ValueError(
                f"SamplingParams.n ({params.n}) should not exceed max_batch_size "
                f"({args.max_batch_size})"
            )
        limit = args.max_num_tokens
        if not args.enable_chunked_prefill and not is_gen_only and limit and prompt_len > limit:
            raise ValueError(
                f"The sum of prompt length ({float(prompt_len)}), query length (0) should "
                f"not exceed max_num_tokens ({limit})"
            )
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if params.temperature is not None and params.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {params.temperature}")
        if params.top_p is not None and not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k is not None and params.top_k < 0:
            raise ValueError(f"top_k must be non-negative, got {params.top_k}")

    # --- runtime stats and KV events -----------------------------------------------------
    def get_stats(self, timeout: float | None = 2) -> list[dict]:
        return self.get_stats_async(timeout).get_results()

    def get_stats_async(self, timeout: float | None = 2) -> IterationResult:
        source = self._engine.stats if self._engine is not None else None
        return _iteration_result(source, timeout)

    def get_kv_cache_events(self, timeout: float | None = 2) -> list[dict]:
        return self.get_kv_cache_events_async(timeout).get_results()

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> IterationResult:
        source = self._engine.events if self._engine is not None else None
        return _iteration_result(source, timeout)

    # --- lifetime ------------------------------------------------------------------------
    def shutdown(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.close()
        if getattr(self, "mpi_session", None) is not None:
            self._close_mpi_session()

    @staticmethod
    def _shutdown_wrapper(self_ref: weakref.ref) -> None:
        instance = self_ref()
        if instance is not None:
            instance.shutdown()

    def __enter__(self) -> BaseLLM:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        del exc_type, exc_value, traceback
        self.shutdown()
        return False

    def __getstate__(self) -> Any:
        raise RuntimeError("LLM object can not be pickled.")

    def __del__(self) -> None:
        self.shutdown()


class LLM(BaseLLM):
    """LLM class is the main class for running a LLM model (PyTorch backend)."""

    def __init__(
        self,
        model: str | Path,
        tokenizer: Any = None,
        tokenizer_mode: Literal["auto", "slow"] = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            tokenizer_mode,
            skip_tokenizer_init,
            trust_remote_code,
            tensor_parallel_size,
            dtype,
            revision,
            tokenizer_revision,
            **kwargs,
        )


def _iteration_result(source: WakeQueue[str] | None, timeout: float | None) -> IterationResult:
    result = IterationResult(source, timeout)
    if source is None:  # events or stats not enabled: nothing will ever arrive
        result._done = True
    return result


def _reject_unsupported(
    params: SamplingParams,
    lora_request: Any,
    prompt_adapter_request: Any,
    disaggregated_params: DisaggregatedParams | None,
    args: TorchLlmArgs,
) -> None:
    """Features the double cannot fake fail loudly instead of being silently ignored."""
    if params.guided_decoding is not None and args.guided_decoding_backend is None:
        raise ValueError("guided decoding requires guided_decoding_backend in the LLM args")
    unsupported = {
        "use_beam_search": params.use_beam_search,
        "prompt_logprobs": params.prompt_logprobs,
        "return_context_logits": params.return_context_logits,
        "return_generation_logits": params.return_generation_logits,
        "logits_processor": params.logits_processor,
        "guided_decoding": params.guided_decoding,
        "embedding_bias": params.embedding_bias,
        "lora_request": lora_request,
        "prompt_adapter_request": prompt_adapter_request,
        "multimodal disaggregated_params": disaggregated_params is not None
        and disaggregated_params.multimodal_embedding_handles is not None,
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(f"{name} is not supported by the TensorRT-LLM test double")

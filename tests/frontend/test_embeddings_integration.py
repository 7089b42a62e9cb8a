"""`POST /v1/embeddings` end to end: the real frontend (uvicorn, etcd, nats-server) on a
`model.task: embed` config, real `Worker`s running the real SmolLM2 `TorchEngine`, and the
official `openai` client (`client.embeddings.create`: float and base64, one input and
batches of texts and token ids). Every vector is checked against the engine's own answer for
the same token ids (which tests/mpi_workers/engine/torch/test_pooled_embeddings.py checks against
transformers). Refusals name their field; a generate deployment refuses embeddings and an
embed deployment refuses generation, naming model.task; an engine that cannot embed is
refused by name; a worker lost before answering costs the client nothing.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from real_workers import engine_worker, mocker_worker, openai_client

from contract.messages import GenerateRequest, PoolingParams, decode_embedding
from frontend.tokenization import TextTokenizer
from mpi_workers.engine.torch.engine import TorchEngine

pytestmark = [pytest.mark.integration, pytest.mark.model]

TEXTS = [
    "Slurm allocates nodes to jobs.",
    "Embeddings turn text into vectors for retrieval, one vector per passage of a corpus.",
    "MPI",
]
EMBED = {"task": "embed"}
_ids = iter(range(10**6))


def torch_engine(model_dir: Path) -> TorchEngine:
    """The real engine (prefill chunks of 16 tokens: longer inputs span several)."""
    return TorchEngine(model_dir, num_blocks=256, max_num_batched_tokens=16, model_name="smol",
                       max_model_len=128)  # fmt: skip


def close(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal to float rounding: a batch, or a prefix served from the cache, computes the
    same rows in other shapes than the reference did."""
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=0, atol=1e-5))


async def engine_vector(engine: TorchEngine, ids: list[int], **pooling: Any) -> np.ndarray:
    """The vector the engine gives directly for `ids` (the reference for the HTTP answer)."""
    request = GenerateRequest(
        request_id=f"ref{next(_ids)}", token_ids=ids, pooling=PoolingParams(**pooling)
    )
    out = await engine.generate_all(request)
    assert out.embedding is not None
    return np.array(decode_embedding(out.embedding), dtype=np.float32)


async def test_texts_and_token_ids_float_and_base64(
    make_frontend: Any, model_dir: Path, tokenizer: TextTokenizer
) -> None:
    fe = await make_frontend(model_settings=EMBED)
    ids = [tokenizer.encode(text, add_special_tokens=True) for text in TEXTS]
    async with engine_worker(fe, torch_engine(model_dir)) as engine, openai_client(fe) as client:
        reference = [await engine_vector(engine, i) for i in ids]

        # no encoding_format: the openai client asks for base64 and decodes it itself
        one = await client.embeddings.create(model="smol", input=TEXTS[1])
        assert one.object == "list" and one.model == "smol" and len(one.data) == 1
        assert one.data[0].index == 0 and one.data[0].object == "embedding"
        assert close(np.array(one.data[0].embedding, dtype=np.float32), reference[1])
        assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids[1])

        batch = await client.embeddings.create(model="smol", input=TEXTS, encoding_format="float")
        assert [d.index for d in batch.data] == [0, 1, 2]
        for data, want in zip(batch.data, reference, strict=True):
            got = np.array(data.embedding, dtype=np.float32)
            assert got.shape == (576,) and close(got, want)
        assert batch.usage.prompt_tokens == sum(len(i) for i in ids)

        # asked for explicitly, base64 comes back as the text: little-endian float32
        encoded = await client.embeddings.create(model="smol", input=ids, encoding_format="base64")
        for data, want in zip(encoded.data, reference, strict=True):
            assert isinstance(data.embedding, str)
            assert close(np.frombuffer(base64.b64decode(data.embedding), dtype="<f4"), want)

        by_ids = await client.embeddings.create(model="smol", input=ids[0])
        assert close(np.array(by_ids.data[0].embedding, dtype=np.float32), reference[0])
        assert abs(float(np.linalg.norm(reference[0])) - 1.0) < 1e-5  # normalized


async def test_mean_pooling_and_matryoshka_dimensions(
    make_frontend: Any, model_dir: Path, tokenizer: TextTokenizer
) -> None:
    pooler = {"pooling_type": "MEAN", "matryoshka_dimensions": [64, 128, 1000]}
    fe = await make_frontend(model_settings={**EMBED, "pooler": pooler})
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=True)
    async with engine_worker(fe, torch_engine(model_dir)) as engine, openai_client(fe) as client:
        cut = await client.embeddings.create(model="smol", input=TEXTS[1], dimensions=64)
        want = await engine_vector(engine, ids, pooling_type="MEAN", dimensions=64)
        assert close(np.array(cut.data[0].embedding, dtype=np.float32), want)
        assert len(want) == 64
        full = await client.embeddings.create(model="smol", input=TEXTS[1])
        whole = await engine_vector(engine, ids, pooling_type="MEAN")
        assert close(np.array(full.data[0].embedding, dtype=np.float32), whole)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.embeddings.create(model="smol", input=TEXTS[1], dimensions=32)
        assert refused.value.body["param"] == "dimensions"
        # configured, but more than the model has: every worker refuses it, by its name here
        with pytest.raises(openai.BadRequestError) as refused:
            await client.embeddings.create(model="smol", input=TEXTS, dimensions=1000)
        assert refused.value.body["param"] == "dimensions"
        assert "hidden size 576" in refused.value.body["message"]
        assert not engine.scheduler.running and not engine.scheduler.waiting


async def test_refusals_name_their_field(make_frontend: Any, model_dir: Path) -> None:
    fe = await make_frontend(model_settings=EMBED)
    async with engine_worker(fe, torch_engine(model_dir)), fe.client() as http:

        async def refused(body: dict[str, Any], status: int = 400) -> dict[str, Any]:
            response = await http.post("/v1/embeddings", json={"model": "smol", **body})
            assert response.status_code == status, response.text
            return response.json()["error"]

        assert (await refused({"input": ""}))["param"] == "input"
        assert (await refused({"input": []}))["param"] == "input"
        assert (await refused({"input": ["a", ""]}))["param"] == "input"
        assert (await refused({"input": [3.5]}))["param"].startswith("input")
        assert (await refused({"input": "x", "dimensions": 8}))["param"] == "dimensions"
        assert (await refused({"input": "x", "encoding_format": "hex"}))["param"] == (
            "encoding_format"
        )
        long = "word " * 200  # over max_model_len 128
        error = await refused({"input": ["short", long]})
        assert error["param"] == "input.1" and error["code"] == "context_length_exceeded"
        assert (await refused({"input": [[1, 2], [10**9]]}))["param"] == "input.1"
        error = await refused({"input": "x", "truncate_prompt_tokens": 1000})
        assert error["param"] == "truncate_prompt_tokens"
        missing = await http.post("/v1/embeddings", json={"model": "other", "input": "x"})
        assert missing.status_code == 404
        chat = await http.post("/v1/chat/completions", json={
            "model": "smol", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"
        assert "model.task: embed" in chat.json()["error"]["message"]
        completion = await http.post("/v1/completions", json={"model": "smol", "prompt": "a"})
        assert completion.status_code == 400
        response = await http.post("/v1/responses", json={"model": "smol", "input": "hi"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
        too_big = await http.post(
            "/v1/embeddings", content=b"x" * (fe.config.frontend.max_request_bytes + 1)
        )
        assert too_big.status_code == 413


async def test_truncate_prompt_tokens_keeps_the_last_tokens(
    make_frontend: Any, model_dir: Path, tokenizer: TextTokenizer
) -> None:
    fe = await make_frontend(model_settings=EMBED)
    long = "Slurm runs jobs on the nodes of a cluster. " * 30
    ids = tokenizer.encode(long, add_special_tokens=True)
    assert len(ids) > 128
    async with engine_worker(fe, torch_engine(model_dir)) as engine, fe.client() as http:
        response = await http.post("/v1/embeddings", json={
            "input": long, "truncate_prompt_tokens": 20})  # fmt: skip
        assert response.status_code == 200, response.text
        want = await engine_vector(engine, ids[-20:])
        got = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
        assert close(got, want)
        assert response.json()["usage"]["prompt_tokens"] == 20
        whole = await http.post(
            "/v1/embeddings", json={"input": long, "truncate_prompt_tokens": -1}
        )
        assert whole.json()["usage"]["prompt_tokens"] == 128


async def test_generate_deployment_refuses_embeddings(make_frontend: Any, model_dir: Path) -> None:
    fe = await make_frontend()
    async with mocker_worker(fe, model_dir), openai_client(fe) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.embeddings.create(model="smol", input="hello")
        assert refused.value.body["param"] == "model"
        assert "model.task: generate" in refused.value.body["message"]


@pytest.mark.parametrize("router", ["least_loaded", "kv"])
async def test_mocker_answers_simulated_vectors_and_says_so(
    make_frontend: Any, model_dir: Path, router: str
) -> None:
    """The mocker (load tests): a pseudo-random unit vector of the model's hidden size, the
    same for the same input, and `simulated: true` in the response; the load and KV
    routers route embeddings as any prompt."""
    fe = await make_frontend(model_settings=EMBED, router=router)
    async with mocker_worker(fe, model_dir), fe.client() as http:
        response = await http.post("/v1/embeddings", json={"input": ["a b c", "d e", "a b c"]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["simulated"] is True
        vectors = [np.array(d["embedding"], dtype=np.float32) for d in body["data"]]
        assert all(v.shape == (576,) for v in vectors)
        assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-5
        assert np.array_equal(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])


async def test_batch_is_spread_over_the_workers_round_robin(
    make_frontend: Any, model_dir: Path, tokenizer: TextTokenizer
) -> None:
    fe = await make_frontend(model_settings=EMBED, router="round_robin")
    texts = [f"passage {k}: {TEXTS[k % 3]}" for k in range(8)]
    ids = [tokenizer.encode(text, add_special_tokens=True) for text in texts]
    first, second = torch_engine(model_dir), torch_engine(model_dir)
    async with (
        engine_worker(fe, first, "agg-g0-i0"),
        engine_worker(fe, second, "agg-g0-i1"),
        openai_client(fe) as client,
    ):
        before = (first.stats.num_finished, second.stats.num_finished)
        answer = await client.embeddings.create(model="smol", input=texts)
        served = (first.stats.num_finished - before[0], second.stats.num_finished - before[1])
        assert served == (4, 4)
        for data, token_ids in zip(answer.data, ids, strict=True):
            want = await engine_vector(first, token_ids)
            got = np.array(data.embedding, dtype=np.float32)
            assert np.allclose(got, want, atol=1e-5)  # either engine, batched differently
    metrics = await _metrics(fe)
    assert 'hpcserve_frontend_requests_total{endpoint="embeddings",status="200"} 1.0' in metrics
    assert "hpcserve_frontend_embedding_inputs_total 8.0" in metrics


async def test_a_worker_lost_before_answering_is_replaced(
    make_frontend: Any, model_dir: Path, tokenizer: TextTokenizer
) -> None:
    """A worker that takes the inputs and never answers, then leaves (its lease revoked):
    its inputs go to the other worker, and the answer is whole."""
    fe = await make_frontend(model_settings=EMBED, router="round_robin")
    ids = [tokenizer.encode(text, add_special_tokens=True) for text in TEXTS]
    async with engine_worker(fe, torch_engine(model_dir)) as engine, openai_client(fe) as client:
        silent = await fe.add_worker("fake-silent", silent=True, tasks=["generate", "embed"])
        answer = asyncio.create_task(client.embeddings.create(model="smol", input=TEXTS))
        async with asyncio.timeout(10):
            await silent.received.wait()
        await silent.deregister()
        done = await asyncio.wait_for(answer, 30)
        assert len(silent.requests) >= 1
        for data, token_ids in zip(done.data, ids, strict=True):
            want = await engine_vector(engine, token_ids)
            assert np.allclose(np.array(data.embedding, dtype=np.float32), want, atol=1e-5)


async def test_an_engine_that_cannot_embed_is_refused_by_name(
    make_frontend: Any, model_dir: Path
) -> None:
    fe = await make_frontend(model_settings=EMBED)
    async with fe.client() as http:
        await fe.add_worker("fake-generate-only")  # its card: tasks ["generate"]
        response = await http.post("/v1/embeddings", json={"input": "hello"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "model" and "fake engine" in error["message"]


async def test_openapi_documents_the_endpoint(make_frontend: Any) -> None:
    fe = await make_frontend(model_settings=EMBED)
    async with fe.client() as http:
        schema = (await http.get("/openapi.json")).json()
    operation = schema["paths"]["/v1/embeddings"]["post"]
    assert "EmbeddingRequest" in str(operation["requestBody"])
    assert "EmbeddingResponse" in str(operation["responses"]["200"])
    assert "input" in schema["components"]["schemas"]["EmbeddingRequest"]["properties"]


async def _metrics(fe: Any) -> str:
    async with fe.client() as http:
        return (await http.get("/metrics")).text

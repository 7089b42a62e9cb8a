"""`hpcserve up configs/local-embed.yaml` end to end: the shipped embedding deployment
(supervisor, etcd, NATS, frontend processes, a torch worker) answering the official openai
client's `embeddings.create`, with vectors equal to transformers' own last hidden state of
the same token ids (LAST pooling, normalized), and generation refused naming model.task."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from up_helpers import UpProcess, openai_client, started

pytestmark = pytest.mark.e2e

TEXTS = ["Slurm allocates nodes to jobs.", "Embeddings turn passages into vectors."]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory):
    args = ["configs/local-embed.yaml", "--set", "frontend.port=0", "--set", "frontend.workers=2"]
    with started(args, tmp_path_factory.mktemp("embed")) as deployment:
        yield deployment


def test_embeddings_are_transformers_last_hidden_state(up: UpProcess) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from contract.config import default_model_dir

    client = openai_client(up)
    model = client.models.list().data[0].id
    answer = client.embeddings.create(model=model, input=TEXTS)
    floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    hf = AutoModel.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    for index, text in enumerate(TEXTS):
        ids = tokenizer(text)["input_ids"]
        with torch.inference_mode():
            last = hf(torch.tensor([ids])).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(last, dim=0).numpy()
        for response in (answer, floats):
            got = np.array(response.data[index].embedding, dtype=np.float32)
            assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()
    assert answer.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)


def test_generation_is_refused_naming_the_task(up: UpProcess) -> None:
    client = openai_client(up)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert refused.value.body["param"] == "model"
    assert "model.task" in refused.value.body["message"]

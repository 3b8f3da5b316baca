"""LoRA adapters through the queue on a real vLLM engine: a tiny random-weight embedder and two
random ``peft`` adapters of it (fixed seeds, ranks 8 and 16, on different modules) built at
test time, served by one worker as three model names, called concurrently with the ``openai``
SDK so that base and adapter requests share engine steps, and checked against a float32
``transformers`` pass with ``peft``'s merged weights."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from devstack import localstack as ls
from devstack import tiny_bert, tiny_lora
from tests.support.stack import api_client, openai_client, serving_worker
from tests.unit.test_config import _run

BASE, LEGAL, CODE = "tiny-embedder", "tiny-embedder-legal", "tiny-embedder-code"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert.build_embedder(tmp_path_factory.mktemp("lora-base"), seed=42, hidden_size=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, base: Path) -> dict[str, Path | None]:
    """Model name -> adapter folder (None: the base model)."""
    root = tmp_path_factory.mktemp("lora")
    code_modules = ("query", "key", "dense")
    return {
        BASE: None,
        LEGAL: tiny_lora.build_adapter(base, root / "legal", seed=1, rank=8),
        CODE: tiny_lora.build_adapter(
            base, root / "code", seed=2, rank=16, target_modules=code_modules
        ),
    }


def adapter_tables(models: dict[str, Path | None]) -> str:
    """The ``[queue.models."<name>"]`` tables of the adapters."""
    tables = ("embedding_task", "scoring_task")
    return "".join(
        ls.model_table(name, tables, folder) for name, folder in models.items() if folder
    )


@pytest.fixture(scope="module")
def lora_worker(
    gateway: ls.Proc, stack_dir: Path, base: Path, models: dict[str, Path | None]
) -> Iterator[ls.Proc]:
    text = ls.worker_config(
        queue_url=gateway.url,
        model_name=BASE,
        model_path=base,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=64,
    )
    with serving_worker(text + adapter_tables(models), stack_dir, "lora") as proc:
        yield proc


def test_base_and_adapters_batched_together_match_peft_merged_weights(
    gateway, lora_worker, base, models, stsb_sentences
):
    """Three model names, one engine: 8 requests of each sent at once (base and adapter
    inputs share engine steps), twice; every vector equals the float32 ``transformers`` pass
    with that adapter merged (the base model's, with none), and each adapter moves the
    vectors away from the base model's."""
    client = openai_client(gateway.url)
    texts = stsb_sentences[40:48]
    names = [BASE, LEGAL, CODE] * 2

    def embed(call: tuple[str, str]) -> list[float]:
        name, text = call
        return client.embeddings.create(model=name, input=text).data[0].embedding

    calls = [(name, text) for name in names for text in texts]
    with ThreadPoolExecutor(len(calls)) as pool:
        got = np.array(list(pool.map(embed, calls)), dtype=np.float32).reshape(6, 8, -1)
    want = {n: tiny_lora.MergedEmbedder(base, models[n]).embed(texts) for n in (BASE, LEGAL, CODE)}
    errors = {n: max(float(np.abs(got[i] - want[n]).max()) for i in (k, k + 3))
              for k, n in enumerate(names[:3])}  # fmt: skip
    base_cos = {n: float((want[n] * want[BASE]).sum(axis=1).min()) for n in (LEGAL, CODE)}
    print(f"lora: max |diff| per model {errors}; min cosine to the base model {base_cos}")
    assert max(errors.values()) < 1e-4
    assert max(base_cos.values()) < 0.99  # the adapters change the vectors


def test_each_adapter_is_a_model_of_its_own(gateway, lora_worker, base, models):
    """``/v1/models`` lists the adapters beside the base model, and scoring a pair on an
    adapter's name uses that adapter (the cosine of its vectors)."""
    with api_client(gateway.url) as api:
        ids = {m["id"] for m in api.get("/v1/models").json()["data"]}
        r = api.post(
            "/v1/score",
            json={"model": CODE, "text_1": "a dog runs", "text_2": "a puppy is running"},
        )
    assert {BASE, LEGAL, CODE} <= ids
    assert r.status_code == 200, r.text
    ref = tiny_lora.MergedEmbedder(base, models[CODE])
    a, b = ref.embed(["a dog runs", "a puppy is running"])
    assert abs(r.json()["data"][0]["score"] - float(a @ b)) < 1e-4


def test_an_adapter_for_a_model_without_lora_support_is_a_config_error(tmp_path, models):
    """vLLM serves a BERT sequence classifier without LoRA support: ``--check`` exits 2
    naming the adapter's key and the file."""
    classifier = tiny_bert.build_cross_encoder(tmp_path / "ce", seed=3)
    text = ls.worker_config(
        queue_url="http://127.0.0.1:9", model_name="ce", model_path=classifier, task="score"
    ).replace('description = "local stack"', f'lora_path = "{models[LEGAL]}"')
    path = tmp_path / "lora.toml"
    path.write_text(text)
    r = _run(path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f'{path}: queue.models."ce".lora_path: vLLM serves this checkpoint as ' in r.stderr
    assert "BertForSequenceClassification, which does not support LoRA" in r.stderr

"""LoRA adapters on the scoring and classification engines (issue 40, point 3): a tiny Qwen3
causal LM served for ``return_logits`` and a tiny RoBERTa sequence classifier for
``/v1/classify``, each with a random ``peft`` adapter (fixed seeds) as a second model name of the
same engine, base and adapter requests sent together, against float32 ``transformers`` with
``peft``'s merged weights."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devstack import localstack as ls
from devstack import tiny_lora
from tests.support.stack import api_client, serving_worker

SCORER, TUNED_SCORER = "tiny-qwen3-scorer", "tiny-qwen3-scorer-tuned"
CLASSIFIER, TUNED_CLASSIFIER = "tiny-roberta-classifier", "tiny-roberta-classifier-tuned"
LABELS = ("neg", "neu", "pos")


def together(gateway: ls.Proc, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """POST every (route, body) at once (base and adapter inputs share engine steps);
    the JSON answers in order."""
    with api_client(gateway.url, timeout=120) as api, ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda call: api.post(call[0], json=call[1]), calls))
    for r in answers:
        assert r.status_code == 200, r.text
    return [r.json() for r in answers]


@pytest.fixture(scope="module")
def scorer_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("qwen3-lora") / "tuned"
    return tiny_lora.build_adapter(
        tiny_path, folder, seed=5, rank=8, target_modules=("q_proj", "v_proj", "down_proj")
    )


@pytest.fixture(scope="module")
def scorer(
    gateway: ls.Proc, stack_dir: Path, tiny_path: Path, scorer_adapter: Path
) -> Iterator[ls.Proc]:
    text = ls.worker_config(
        queue_url=gateway.url,
        model_name=SCORER,
        model_path=tiny_path,
        task="score",
        dtype="float32",
        max_model_len=512,
        max_num_seqs=32,
        generator_extra="engine_args = { block_size = 32 }",
    )
    text += ls.model_table(TUNED_SCORER, ("scoring_task",), scorer_adapter)
    with serving_worker(text, stack_dir, "lora-scorer") as proc:
        yield proc


def test_a_causal_lms_adapter_gives_its_merged_weights_logits(
    gateway, scorer, tiny_path, scorer_adapter, stsb_sentences
):
    """``return_logits`` of the base model and of its adapter, sent together, each equal to
    the last position's logits of float32 ``transformers`` (merged weights for the adapter)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    texts, ids = stsb_sentences[60:68], [5, 17, 300, 4000]
    calls = [
        ("/v1/embeddings", {"model": name, "input": [t], "return_logits": ids})
        for name in (SCORER, TUNED_SCORER)
        for t in texts
    ]
    got = np.array([a["data"][0]["embedding"] for a in together(gateway, calls)]).reshape(2, 8, 4)
    errors = []
    for k, adapter in enumerate((None, scorer_adapter)):
        model = tiny_lora.load(tiny_path, adapter)
        with torch.no_grad():
            want = np.array(
                [model(**tok(t, return_tensors="pt")).logits[0, -1, ids].numpy() for t in texts]
            )
        errors.append(float(np.abs(got[k] - want).max()))
    moved = float(np.abs(got[1] - got[0]).max())
    print(
        f"lora causal-lm: max |diff| base {errors[0]:.2e}, adapter {errors[1]:.2e}; "
        f"moved {moved:.3f}; first adapter answer {got[1, 0].tolist()}"
    )
    assert max(errors) < 1e-4
    assert moved > 1e-2  # the adapter changes the logits


@pytest.fixture(scope="module")
def classifier_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("roberta-lora")
    base = tiny_lora.build_roberta_classifier(root / "base", seed=6, labels=LABELS)
    return base, tiny_lora.build_adapter(base, root / "tuned", seed=7, rank=16)


@pytest.fixture(scope="module")
def classifier(
    gateway: ls.Proc, stack_dir: Path, classifier_paths: tuple[Path, Path]
) -> Iterator[ls.Proc]:
    base, adapter = classifier_paths
    text = ls.worker_config(
        queue_url=gateway.url,
        model_name=CLASSIFIER,
        model_path=base,
        task="classify",
        dtype="float32",
        max_model_len=256,
        max_num_seqs=32,
    )
    text += ls.model_table(TUNED_CLASSIFIER, ("classification_task",), adapter)
    with serving_worker(text, stack_dir, "lora-classifier") as proc:
        yield proc


def test_a_classifiers_adapter_gives_its_merged_weights_probabilities(
    gateway, classifier, classifier_paths, stsb_sentences
):
    """``/v1/classify`` on the base classifier and on its adapter, sent together: each
    answer's probabilities equal the softmax of float32 ``transformers`` (merged weights for
    the adapter), labels by ``id2label``."""
    import torch
    from transformers import AutoTokenizer

    base, adapter = classifier_paths
    tok = AutoTokenizer.from_pretrained(base)
    texts = stsb_sentences[70:78]
    calls = [
        ("/v1/classify", {"model": name, "input": [t]})
        for name in (CLASSIFIER, TUNED_CLASSIFIER)
        for t in texts
    ]
    answers = together(gateway, calls)
    got = np.array([a["data"][0]["probs"] for a in answers]).reshape(2, 8, 3)
    errors = []
    for k, folder in enumerate((None, adapter)):
        model = tiny_lora.load(base, folder)
        with torch.no_grad():
            logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
        want = torch.softmax(logits, dim=-1).numpy()
        errors.append(float(np.abs(got[k] - want).max()))
    moved = float(np.abs(got[1] - got[0]).max())
    print(
        f"lora classify: max |diff| base {errors[0]:.2e}, adapter {errors[1]:.2e}; "
        f"moved {moved:.3f}; first adapter answer {answers[8]['data'][0]}"
    )
    assert max(errors) < 1e-4
    assert moved > 1e-2  # the adapter changes the probabilities
    assert [a["data"][0]["label"] for a in answers] == [
        LABELS[i] for i in got.reshape(16, 3).argmax(1)
    ]

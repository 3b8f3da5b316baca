"""LoRA adapters in the config (``queue.models."<name>".lora_path``) and the engine arguments
they need, without vLLM: adapter folders are written here as ``peft`` writes their config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack import localstack as ls
from tests.support import MINILM_FILES
from worker.config import ConfigError, load_config
from worker.engine import engine_kwargs
from worker.engine.lora import AdapterError, adapter_rank, engine_lora_kwargs


def adapter(folder: Path, **config: object) -> Path:
    """A folder with a PEFT ``adapter_config.json`` (rank 8 unless ``config`` says)."""
    folder.mkdir(parents=True)
    body = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query"]}
    (folder / "adapter_config.json").write_text(json.dumps({**body, **config}))
    return folder


def config_with_adapter(tmp_path: Path, lora_path: str, extra: str = "") -> Path:
    """A worker config serving MiniLM and, as ``tuned``, the adapter at ``lora_path``."""
    text = ls.worker_config(queue_url="http://127.0.0.1:9", model_path=MINILM_FILES)
    text += f'\n[queue.models."tuned"]\nlora_path = "{lora_path}"\n{extra}'
    text += '[queue.models."tuned".embedding_task]\nsupported = true\n'
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load(path: Path):  # type: ignore[no-untyped-def]
    return load_config(path, {"INFERENCE_WORKER_QUEUE_TOKEN": "t"}, check_engine_args=False)


def test_a_relative_lora_path_is_resolved_against_the_config_file(tmp_path):
    folder = adapter(tmp_path / "adapters" / "tuned")
    cfg = load(config_with_adapter(tmp_path, "adapters/tuned"))
    assert cfg.queue.models["tuned"].lora_path == folder.resolve()
    assert cfg.queue.models["all-minilm-l6-v2"].lora_path is None  # the base model


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p, "expected an adapter folder, .* is not a directory"),
        (lambda p: (p.mkdir(), p)[1], "adapter_config.json cannot be read"),
        (lambda p: adapter(p, peft_type="IA3"), "is not a PEFT LoRA adapter's config"),
        (lambda p: adapter(p, r=0), "expected a positive integer r"),
        (lambda p: adapter(p, r="8"), "expected a positive integer r"),
        (lambda p: adapter(p, r=1024), r"rank 1024 is past the largest vLLM serves \(512\)"),
    ],
    ids=["missing", "no-config", "not-lora", "rank-0", "rank-text", "rank-too-large"],
)
def test_an_adapter_that_cannot_be_served_is_a_config_error_naming_the_key(
    tmp_path, make, expected
):
    make(tmp_path / "tuned")
    path = config_with_adapter(tmp_path, str(tmp_path / "tuned"))
    with pytest.raises(ConfigError, match=expected) as e:
        load(path)
    assert str(e.value).startswith(f'{path}: queue.models."tuned".lora_path: ')


def test_an_adapter_config_that_is_not_json_is_named(tmp_path):
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(
        ConfigError, match=r'"tuned"\.lora_path: .*adapter_config\.json is not JSON'
    ):
        load(config_with_adapter(tmp_path, str(folder)))


def test_lora_path_must_be_a_string(tmp_path):
    path = (
        config_with_adapter(tmp_path, "x").read_text().replace('lora_path = "x"', "lora_path = 3")
    )
    (tmp_path / "config.toml").write_text(path)
    with pytest.raises(
        ConfigError, match=r"queue\.models\.tuned\.lora_path: Input is not a valid path"
    ):
        load(tmp_path / "config.toml")


@pytest.mark.parametrize(
    ("ranks", "rank"), [([8], 8), ([1], 1), ([2], 8), ([8, 16], 16), ([17], 32), ([300], 320)]
)
def test_max_lora_rank_is_the_smallest_vllm_value_that_fits_every_adapter(ranks, rank):
    kw = engine_lora_kwargs(ranks, slots=3)
    assert kw == {"enable_lora": True, "max_loras": 3, "max_lora_rank": rank}


def test_engine_args_win_over_the_adapters_arguments(tmp_path):
    """An operator may cap the adapters in one step (GPU memory) with ``engine_args``."""
    adapter(tmp_path / "tuned", r=16)
    path = config_with_adapter(tmp_path, str(tmp_path / "tuned"))
    text = path.read_text().replace(
        'dtype = "float32"', 'dtype = "float32"\nengine_args = { max_loras = 1 }'
    )
    path.write_text(text)
    cfg = load(path)
    kw = engine_kwargs(cfg.generator, engine_lora_kwargs([adapter_rank(tmp_path / "tuned")], 2))
    assert (kw["enable_lora"], kw["max_lora_rank"], kw["max_loras"]) == (True, 16, 1)
    assert "enable_lora" not in engine_kwargs(cfg.generator)  # no adapters: no LoRA


def test_adapter_rank_reads_peft_config(tmp_path):
    assert adapter_rank(adapter(tmp_path / "a", r=64)) == 64
    with pytest.raises(AdapterError):
        adapter_rank(tmp_path / "none")

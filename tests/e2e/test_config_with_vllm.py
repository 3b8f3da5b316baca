"""Config checks that ask vLLM or run ``inference-worker --check``: an unknown engine argument,
errors that name the key, a missing model folder, a good config."""

from __future__ import annotations

import pytest

from devstack import localstack as ls
from tests.unit.test_config import _good, _run
from worker.config import ConfigError, load_config


def test_an_unknown_engine_argument_is_a_config_error_naming_it(tmp_path):
    """``generator.engine_args`` names only ``vllm.AsyncEngineArgs`` fields (read from vLLM)."""
    path = tmp_path / "bad.toml"
    text = _good(ls.minilm_path()).replace(
        'dtype = "float32"', 'dtype = "float32"\nengine_args = { no_such_arg = 1 }'
    )
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, {"INFERENCE_WORKER_QUEUE_TOKEN": "t"})
    message = str(e.value)
    assert str(path) in message and "generator.engine_args.no_such_arg" in message
    assert "unknown key" in message


def test_bad_config_exits_2_naming_the_key(tmp_path):
    """``inference-worker --check`` prints the config error and exits 2."""
    path = tmp_path / "bad.toml"
    path.write_text(_good(ls.minilm_path()).replace("max_num_seqs = 256", 'max_num_seqs = "x"'))
    r = _run(path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{path}: generator.max_num_seqs: Input should be a valid integer" in r.stderr
    assert "'x'" not in r.stderr  # the value is not echoed


def test_missing_model_dir_reported_before_vllm_starts(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(_good(tmp_path / "nope"))
    r = _run(path)
    assert r.returncode == 2
    assert "generator.model_path" in r.stderr and "nope" in r.stderr
    assert "vllm" not in r.stderr.lower().replace("vllm.asyncengineargs", "")


def test_good_config_checks_ok(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(_good(ls.minilm_path()))
    r = _run(path)
    assert r.returncode == 0, r.stderr

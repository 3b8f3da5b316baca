"""CPU-host defaults: ``dtype = "auto"`` and an unset ``gpu_memory_utilization``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker import cpu_host
from worker.config import GeneratorConfig
from worker.cpu_host import CpuInfo, choose_dtype, choose_memory_fraction

GIB = 1024**3

# First-CPU blocks of /proc/cpuinfo, cut to the lines that matter (flags shortened).
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
"""
AMX_HOST = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
GENOA_HOST = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: avx2 avx512f avx512_bf16 avx512_vnni
"""


@pytest.mark.parametrize(
    "text,dtype,named",
    [
        (AVX2_ONLY, "float32", "neither avx512_bf16 nor amx_bf16"),
        (AMX_HOST, "bfloat16", "avx512_bf16 and amx_bf16"),
        (GENOA_HOST, "bfloat16", "avx512_bf16"),
        ("", "float32", "neither"),
    ],
)
def test_auto_dtype_follows_native_bfloat16(text, dtype, named):
    chosen, why = choose_dtype(CpuInfo.parse(text))
    assert chosen == dtype
    assert named in why


def test_cpuinfo_model_name_and_flags():
    cpu = CpuInfo.parse(AMX_HOST + "\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: sse\n")
    assert cpu.model_name == "Intel(R) Xeon(R) Platinum 8481C"
    assert cpu.bf16_flags == ["avx512_bf16", "amx_bf16"]
    assert "sse" not in cpu.flags  # the first CPU's flags


def test_missing_cpuinfo_reads_as_no_flags(tmp_path: Path):
    assert CpuInfo.read(tmp_path / "nope") == CpuInfo("unknown", frozenset())


def test_memory_fraction_fits_what_is_available():
    # The host of the report: vLLM's 0.92 would need 10.09 GiB, 9.34 of 10.96 were available.
    total, available = int(10.96 * GIB), int(9.34 * GIB)
    fraction = choose_memory_fraction(total, available)
    assert fraction == 0.68
    assert fraction * total <= available
    assert 0.92 * total > available  # vLLM's default would not have started


@pytest.mark.parametrize(
    "total,available,want",
    [
        (100, 100, 0.8),  # idle host: 80 % of it
        (100, 0, 0.01),  # nothing available: the floor; vLLM then says why it cannot start
        (100, 200, 0.92),  # more available than total (cgroup figures): vLLM's default caps it
        (0, 10, 0.01),
    ],
)
def test_memory_fraction_bounds(total, available, want):
    assert choose_memory_fraction(total, available) == want


MINILM = {"num_hidden_layers": 6, "hidden_size": 384, "intermediate_size": 1536}
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256}


def test_a_model_cheap_per_token_gets_longer_engine_steps():
    """``max_num_batched_tokens`` unset: a step of 4,096 all-MiniLM-L6-v2 tokens' compute,
    as a power of two, at most 16,384 and at least max_model_len; vLLM's throughput mode
    (None) for a model as costly as all-MiniLM-L6-v2 or more, or of unknown size."""
    assert cpu_host.flops_per_token(MINILM) == 21_233_664
    assert cpu_host.STEP_FLOPS == 4096 * 21_233_664
    assert cpu_host.choose_step_tokens(cpu_host.flops_per_token(MINILM)) is None
    big = {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072}  # BERT-base
    assert cpu_host.choose_step_tokens(cpu_host.flops_per_token(big)) is None
    tiny = cpu_host.flops_per_token(TINY_BERT)
    assert tiny == 2 * 2 * (4 * 128 * 128 + 2 * 128 * 256)
    assert cpu_host.choose_step_tokens(tiny) == 16384  # ~166k tokens' worth, capped
    assert cpu_host.choose_step_tokens(tiny, max_model_len=32768) == 32768
    # Between: 4 x cheaper than all-MiniLM-L6-v2 -> 16,384; 3 x -> 12,288 -> 8,192.
    assert cpu_host.choose_step_tokens(cpu_host.STEP_FLOPS // 16384) == 16384
    assert cpu_host.choose_step_tokens(cpu_host.STEP_FLOPS // 12288) == 8192
    assert cpu_host.choose_step_tokens(cpu_host.STEP_FLOPS // 4096) is None
    for odd in ({}, {**MINILM, "hidden_size": None}, {**MINILM, "num_hidden_layers": True}):
        assert cpu_host.flops_per_token(odd) is None
    assert cpu_host.choose_step_tokens(None) is None


def test_step_tokens_are_read_from_the_checkpoint_config(tmp_path: Path):
    (tmp_path / "config.json").write_text(
        json.dumps({**TINY_BERT, "max_position_embeddings": 512}), encoding="utf-8"
    )
    gen = GeneratorConfig(model_path=tmp_path)
    assert cpu_host.model_step_tokens(gen) == (cpu_host.flops_per_token(TINY_BERT), 16384)
    long = {**TINY_BERT, "max_position_embeddings": 40960}
    (tmp_path / "config.json").write_text(json.dumps(long), encoding="utf-8")
    assert cpu_host.model_step_tokens(gen)[1] == 40960  # a step holds the longest input
    assert cpu_host.model_step_tokens(gen.model_copy(update={"max_model_len": 512}))[1] == 16384
    (tmp_path / "config.json").write_text(json.dumps(MINILM), encoding="utf-8")
    assert cpu_host.model_step_tokens(gen)[1] is None
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    assert cpu_host.model_step_tokens(gen) == (None, None)
    assert cpu_host.model_step_tokens(_gen()) == (None, None)  # no config.json at /m


def _gen(**kw: object) -> GeneratorConfig:
    return GeneratorConfig(model_path=Path("/m"), **kw)  # type: ignore[arg-type]


def test_idle_openmp_threads_sleep_and_the_tokenizer_stays_on_one_thread_unless_set(monkeypatch):
    """On the CPU build of vLLM the worker sets ``OMP_WAIT_POLICY=PASSIVE`` (before torch
    loads OpenMP) and ``TOKENIZERS_PARALLELISM=false``; a value the operator set is kept; on
    any other build nothing is set."""
    monkeypatch.setattr(cpu_host, "is_cpu_build", lambda: False)
    env: dict[str, str] = {}
    cpu_host.set_cpu_env(env)
    assert env == {}
    monkeypatch.setattr(cpu_host, "is_cpu_build", lambda: True)
    cpu_host.set_cpu_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    env = {"OMP_WAIT_POLICY": "ACTIVE", "TOKENIZERS_PARALLELISM": "true"}
    cpu_host.set_cpu_env(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "TOKENIZERS_PARALLELISM": "true"}

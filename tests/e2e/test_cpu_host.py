"""What this CPU host resolves to, asked of vLLM's own platform and NUMA helpers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_cpu_host import TINY_BERT, _gen
from worker import cpu_host
from worker.config import GeneratorConfig
from worker.cpu_host import CpuInfo, choose_dtype
from worker.engine import engine_kwargs


def test_resolve_on_this_host_fills_only_what_is_open(tmp_path: Path):
    """This machine runs vLLM's CPU backend: ``auto`` and an unset fraction are resolved from
    its own /proc/cpuinfo and NUMA node; explicit values are kept."""
    assert cpu_host.is_cpu_platform()
    resolved = cpu_host.resolve(_gen())
    assert resolved.dtype == choose_dtype(CpuInfo.read())[0]
    _, total, available = cpu_host.node_memory()
    assert resolved.gpu_memory_utilization is not None
    assert resolved.gpu_memory_utilization * total <= available
    explicit = cpu_host.resolve(_gen(dtype="bfloat16", gpu_memory_utilization=0.5))
    assert (explicit.dtype, explicit.gpu_memory_utilization) == ("bfloat16", 0.5)
    via_engine_args = cpu_host.resolve(
        _gen(engine_args={"dtype": "float16", "gpu_memory_utilization": 0.2})
    )
    assert via_engine_args.dtype == "auto"  # engine_args win in engine_kwargs
    assert via_engine_args.gpu_memory_utilization is None
    # max_num_batched_tokens unset: vLLM's throughput mode (twice its default); a value set in
    # the config or in engine_args stays, and so does an explicit performance_mode.
    # block_size unset: 32 tokens per block (vLLM's CPU default 128); a value given stays.
    assert resolved.engine_args == {"performance_mode": "throughput", "block_size": 32}
    assert cpu_host.BLOCK_SIZE == 32
    assert engine_kwargs(resolved)["performance_mode"] == "throughput"
    assert engine_kwargs(resolved)["block_size"] == 32
    assert "performance_mode" not in cpu_host.resolve(_gen(max_num_batched_tokens=8192)).engine_args
    for args in ({"max_num_batched_tokens": 1024}, {"performance_mode": "interactivity"}):
        assert cpu_host.resolve(_gen(engine_args=args)).engine_args == {**args, "block_size": 32}
    for size in (16, 128):
        args = {"block_size": size}
        assert cpu_host.resolve(_gen(engine_args=args)).engine_args == {
            "performance_mode": "throughput",
            "block_size": size,
        }
    # A checkpoint 40x cheaper per token than all-MiniLM-L6-v2: 16,384 tokens per step, in
    # throughput mode (for max_num_seqs); a value in the config stays.
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT), encoding="utf-8")
    cheap = cpu_host.resolve(GeneratorConfig(model_path=tmp_path))
    assert cheap.max_num_batched_tokens == 16384
    assert cheap.engine_args["performance_mode"] == "throughput"
    assert engine_kwargs(cheap)["max_num_batched_tokens"] == 16384
    pinned = cpu_host.resolve(GeneratorConfig(model_path=tmp_path, max_num_batched_tokens=2048))
    assert pinned.max_num_batched_tokens == 2048
    assert resolved.max_num_batched_tokens is None  # no config.json at /m: vLLM's 4,096
    # engine_core = "auto": vLLM's LLMEngine in a process of the worker's own for one rank,
    # AsyncLLM for several; an explicit value stays.
    assert resolved.engine_core == "process"
    assert cpu_host.resolve(_gen(tensor_parallel_size=2)).engine_core == "asyncllm"
    assert cpu_host.resolve(_gen(engine_core="thread")).engine_core == "thread"
    assert cpu_host.resolve(_gen(engine_core="asyncllm")).engine_core == "asyncllm"
    # one_thread_step_tokens unset: small engine steps on one thread; 0 (off) or a value stays.
    assert resolved.one_thread_step_tokens == cpu_host.ONE_THREAD_STEP_TOKENS == 128
    for value in (0, 512):
        assert cpu_host.resolve(_gen(one_thread_step_tokens=value)).one_thread_step_tokens == value

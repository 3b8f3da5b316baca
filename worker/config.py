"""Worker configuration: the Pharia inference-worker ``config.toml``, edition 1.

The file format is the one documented for Pharia's vLLM worker (see
``docs/configuration.md``); this module adds optional keys an operator of vLLM
expects (``dtype``, ``gpu_memory_utilization``, ``engine_args`` ...), each with
vLLM's own default when absent.

``load_config(path)`` returns a validated, complete :class:`Config` (paths resolved and checked,
token resolved); it raises :class:`ConfigError` whose message names the file, the key path
(``generator.max_num_seqs``) and what was expected. ``model_adverts(cfg, engine)`` builds what
the worker advertises to the queue once its engine runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator

from common.protocol import EngineTask, ScoreType
from worker.model_entry import TASK_TABLES, ModelEntry, Strict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Environment variable that overrides ``queue.token`` so secrets stay out of files.
TOKEN_ENV = "INFERENCE_WORKER_QUEUE_TOKEN"
#: Environment variable naming a file that holds the token (e.g. a mounted Kubernetes Secret).
TOKEN_FILE_ENV = "INFERENCE_WORKER_QUEUE_TOKEN_FILE"


#: How vLLM's engine metrics are named on ``/metrics`` (``monitoring.vllm_metric_names``).
VllmMetricNames = Literal["prometheus", "upstream"]


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` names the file and the key path."""


#: Paths come from TOML strings; everything else must have its TOML type exactly.
LaxPath = Annotated[Path, Field(strict=False)]


class GeneratorConfig(Strict):
    """``[generator]``: the vLLM engine."""

    type: Literal["vllm"] = "vllm"
    model_path: LaxPath
    #: ``embed``: pooled embeddings. ``embed_sparse``: sparse lexical embeddings of a SPLADE
    #: checkpoint (a ``BertForMaskedLM``, served as vLLM's ``BertSpladeSparseEmbeddingModel``).
    #: ``score``: scores of (query, document) pairs and, on a causal LM, logits of chosen
    #: token ids at the last position. ``classify``: a sequence classifier's class
    #: probabilities (vLLM's pooling runner, ``classify``).
    task: EngineTask = "embed"
    #: How ``task = "score"`` scores a pair (:data:`~common.protocol.ScoreType`). By default
    #: from the checkpoint: a ``*ForCausalLM`` architecture is ``causal-lm`` (vLLM's generate
    #: runner, ``return_logits``); any other is served by vLLM's pooling runner with the score
    #: type vLLM gives it (a 1-label sequence classifier: ``cross-encoder``; ColBERT:
    #: ``late-interaction``; an embedding model: ``bi-encoder``). An embedding worker
    #: (``task = "embed"``) scores pairs as ``bi-encoder``.
    score_type: ScoreType | None = None
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=256, gt=0)
    pipeline_parallel_size: int = Field(default=1, gt=0)
    tensor_parallel_size: int = Field(default=1, gt=0)
    # Extensions (optional; vLLM's default when absent).
    dtype: Literal["auto", "float32", "float16", "bfloat16", "half", "float"] = "auto"
    gpu_memory_utilization: Annotated[float, Field(strict=False)] | None = Field(
        default=None, gt=0, le=1
    )
    tokenizer_path: LaxPath | None = None
    enforce_eager: bool | None = None
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    enable_prefix_caching: bool | None = None
    trust_remote_code: bool = False
    #: Where vLLM's engine core runs (:mod:`worker.engine.thread`, :mod:`worker.engine.process`):
    #: ``asyncllm`` — behind vLLM's ``AsyncLLM``, in its engine-core process, each request and
    #: output sent on its own (vLLM's online serving; GPU hosts, engines of several ranks);
    #: ``process`` — vLLM's ``LLMEngine`` in a process of the worker's own, fed in batches
    #: over a pipe; ``thread`` — that engine in the worker process, stepped by a thread;
    #: ``auto`` — ``process`` on CPU hosts for an engine of one rank, else ``asyncllm``.
    engine_core: Literal["auto", "asyncllm", "process", "thread"] = "auto"
    #: With ``engine_core`` ``process`` or ``thread``: an engine step of at most this many
    #: prompt tokens runs on one intra-op thread instead of all (:mod:`worker.engine.step_threads`;
    #: waking sleeping OpenMP threads costs a small step more than they gain). 0: every step
    #: on all threads. Unset: 128 on CPU hosts (:mod:`worker.cpu_host`), 0 elsewhere.
    one_thread_step_tokens: int | None = Field(default=None, ge=0)
    #: vLLM engines of this model in the worker, sharing its device (:mod:`worker.engine.replicas`):
    #: each gets ``1 / replicas`` of ``gpu_memory_utilization`` and, on a CPU host, its own
    #: cores; pulled items go to the least busy one.
    replicas: int = Field(default=1, gt=0)
    #: Any other ``vllm.AsyncEngineArgs`` field, passed through unchanged
    #: (e.g. ``block_size``, ``hf_overrides``, ``distributed_executor_backend``).
    engine_args: dict[str, Any] = Field(default_factory=dict)

    def checkpoint_config(self) -> dict[str, Any]:
        """The checkpoint's Hugging Face ``config.json`` (in ``model_path``) as read before
        vLLM starts; ``{}`` where it cannot be read or is not a JSON object."""
        try:
            text = (Path(self.model_path) / "config.json").read_text(encoding="utf-8")
            config = json.loads(text)
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def sparse_architecture(self) -> str | None:
        """The vLLM model class that serves this checkpoint's sparse embeddings
        (:data:`SPARSE_ARCHITECTURES`; the one ``engine_args.hf_overrides.architectures``
        names, if any; BGE-M3's for an ``XLMRobertaModel`` with a ``sparse_linear.pt``;
        SPLADE's when ``config.json`` names no architectures or cannot be read); None when
        it names architectures none of which has one."""
        named = self._overridden_architecture()
        if named is not None:
            return named
        archs = [str(a) for a in self.checkpoint_config().get("architectures") or []]
        if not archs:
            return SPLADE
        if "XLMRobertaModel" in archs and (Path(self.model_path) / "sparse_linear.pt").is_file():
            return BGE_M3
        return next((SPARSE_ARCHITECTURES[a] for a in archs if a in SPARSE_ARCHITECTURES), None)

    def architecture_override(self) -> str | None:
        """The vLLM model class to start in place of the checkpoint's own: the sparse one for
        ``task = "embed_sparse"``, BGE-M3's for any task on a BGE-M3 checkpoint (its dense,
        sparse and per-token vectors from one engine); None otherwise or when
        ``engine_args.hf_overrides`` names the architectures."""
        if self._overridden_architecture() is not None:
            return None
        sparse = self.sparse_architecture()
        return sparse if self.task == "embed_sparse" or sparse == BGE_M3 else None

    def served_architectures(self) -> list[str]:
        """The architectures vLLM starts the model as: the one ``engine_args.hf_overrides``
        names or :meth:`architecture_override`'s, else ``config.json``'s ([] if none)."""
        named = self._overridden_architecture() or self.architecture_override()
        archs = self.checkpoint_config().get("architectures") or []
        return [named] if named else [str(a) for a in archs]

    def _overridden_architecture(self) -> str | None:
        """The architecture ``engine_args.hf_overrides.architectures`` names first, if any."""
        overrides = self.engine_args.get("hf_overrides")
        if isinstance(overrides, dict) and overrides.get("architectures"):
            return str(overrides["architectures"][0])
        return None


#: vLLM's model classes with sparse embeddings: SPLADE (a BERT masked LM: ``log(1 +
#: relu(logits))`` max-pooled over the tokens, the vocabulary's weights) and BGE-M3 (lexical
#: weights per token from its ``sparse_linear`` head, the largest per token id).
SPLADE, BGE_M3 = "BertSpladeSparseEmbeddingModel", "BgeM3EmbeddingModel"
#: Checkpoint architectures -> the vLLM model class serving their sparse embeddings.
SPARSE_ARCHITECTURES = {"BertForMaskedLM": SPLADE, SPLADE: SPLADE, BGE_M3: BGE_M3}


class QueueConfig(Strict):
    """``[queue]``: where to pull work from."""

    url: str
    token: str | None = None
    checkpoint_name: str
    version: int = 1
    tags: list[str] = Field(default_factory=list)
    #: Retries of a failed HTTP call (connection error, timeout, 5xx, 429) before giving up on it.
    http_request_retries: int = Field(default=7, ge=0)
    service_name: str = "worker"
    service_role: str = "Worker"
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    # Extensions.
    #: Seconds a pull may wait at the queue for work (long polling).
    pull_wait_seconds: Annotated[float, Field(strict=False)] = Field(default=10.0, gt=0, le=60)
    #: Items the worker keeps in the engine at once; default ``2 * generator.max_num_seqs``.
    max_items_in_flight: int | None = Field(default=None, gt=0)
    #: Estimated prompt tokens the worker keeps in the engine at once; default
    #: ``4 * max_num_batched_tokens`` of the engine (a few engine steps of work).
    max_tokens_in_flight: int | None = Field(default=None, gt=0)
    #: While interactive inputs flow: estimated tokens of batch-job inputs let into the
    #: engine at once (:mod:`worker.batch_gate`): small, so that an interactive input waits
    #: about one short engine step.
    batch_tokens_beside_interactive: int = Field(default=16, gt=0)
    #: Seconds without an interactive input after which batch inputs may fill the worker.
    interactive_quiet_seconds: Annotated[float, Field(strict=False)] = Field(default=2.0, gt=0)
    #: Timeout of one HTTP call to the queue, seconds (pulls add ``pull_wait_seconds``).
    http_timeout_seconds: Annotated[float, Field(strict=False)] = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")


class MonitoringConfig(Strict):
    """``[monitoring]``: Prometheus metrics and probes."""

    metrics_port: int = Field(default=4000, ge=0, le=65535)
    #: Extra TCP ports to listen on that accept and close connections while the worker is
    #: alive, for TCP liveness probes.
    tcp_probes: list[int] = Field(default_factory=list)
    metrics_host: str = "0.0.0.0"
    #: How vLLM's engine metrics are named on ``/metrics``: ``"prometheus"`` renames
    #: ``vllm:x`` to ``vllm_x`` (Prometheus naming conventions; ``promtool check metrics``
    #: passes), ``"upstream"`` keeps vLLM's own ``vllm:x`` names (for vLLM's dashboards).
    vllm_metric_names: VllmMetricNames = "prometheus"


class Config(Strict):
    """The whole file. Edition 1 is the only one."""

    edition: Literal[1]
    generator: GeneratorConfig
    queue: QueueConfig
    monitoring: MonitoringConfig = MonitoringConfig()
    #: Seconds to finish in-flight items after SIGTERM before handing the rest back.
    drain_timeout_seconds: Annotated[float, Field(strict=False)] = Field(default=30.0, ge=0)
    _source: Path = PrivateAttr(default=Path("config.toml"))

    @property
    def source(self) -> Path:
        """The file this config was loaded from."""
        return self._source


def _key_path(loc: tuple[Any, ...]) -> str:
    parts = []
    for p in loc:
        s = str(p)
        parts.append(s if s.replace("_", "").isalnum() else f'"{s}"')
    return ".".join(parts)


def _describe(err: Any) -> str:
    """What was expected at one key; never the value given (it may be a secret)."""
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    return str(err["msg"])


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    check_engine_args: bool = True,
) -> Config:
    """Read, validate and resolve a worker config file: the returned config is complete.

    - relative ``model_path`` / ``tokenizer_path`` are resolved against the file's folder;
      ``pkg:<module>[/<folder>]`` names a folder inside an installed Python package; both must
      be existing folders;
    - ``queue.token`` is ``$INFERENCE_WORKER_QUEUE_TOKEN``, else the stripped contents of the
      file named by ``$INFERENCE_WORKER_QUEUE_TOKEN_FILE``, else the file's value;
    - every model advertises the generator's task;
    - a model's ``lora_path`` is resolved as ``model_path`` and holds a PEFT LoRA adapter of
      a rank vLLM serves;
    - ``generator.engine_args`` names only ``vllm.AsyncEngineArgs`` fields, and the model vLLM
      serves supports LoRA where a ``lora_path`` is set (imports vLLM for either;
      ``check_engine_args=False`` skips both).

    Raises :class:`ConfigError` (message: ``<file>: <key.path>: <what was expected>``, one line
    per problem; never the value given) for an unreadable or non-UTF-8 file, invalid TOML, an
    unknown key, a wrong type, a missing required key, a missing or unreadable token, a model
    folder that does not exist, an adapter that cannot be served, or an unknown engine
    argument.
    """
    environ = os.environ if environ is None else environ
    path = Path(path)
    cfg = _parse(path)
    paths = _model_paths(path, cfg.generator)
    token = _token(path, cfg.queue.token, environ)
    models = _adapter_paths(path, cfg.queue.models)
    cfg = cfg.model_copy(
        update={
            "generator": cfg.generator.model_copy(update=paths),
            "queue": cfg.queue.model_copy(update={"token": token, "models": models}),
        }
    )
    cfg._source = path
    _check_models(path, cfg)
    if check_engine_args and cfg.generator.engine_args:  # vLLM imported only to check them
        unknown = unknown_engine_args(cfg.generator)
        if unknown:
            raise ConfigError(
                f"{path}: generator.engine_args.{unknown[0]}: unknown key "
                "(expected a field of vllm.AsyncEngineArgs)"
            )
    if check_engine_args:
        _check_lora_support(path, cfg)
    return cfg


def unknown_engine_args(gen: GeneratorConfig) -> list[str]:
    """Names in ``generator.engine_args`` that ``vllm.AsyncEngineArgs`` does not have
    (imports vLLM)."""
    import dataclasses

    from vllm import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    return sorted(k for k in gen.engine_args if k not in known)


def _parse(path: Path) -> Config:
    """The file as a validated :class:`Config` (paths and token not resolved yet)."""
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: {_key_path(err['loc'])}: {_describe(err)}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def _model_paths(path: Path, gen: GeneratorConfig) -> dict[str, Path]:
    """``model_path`` / ``tokenizer_path`` resolved (see :func:`load_config`); ConfigError
    naming the key if one is not an existing folder."""
    paths = {
        "model_path": _folder(path, "generator.model_path", gen.model_path, "a model directory")
    }
    if gen.tokenizer_path is not None:
        key = "generator.tokenizer_path"
        paths["tokenizer_path"] = _folder(path, key, gen.tokenizer_path, "a model directory")
    return paths


def _adapter_paths(path: Path, models: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    """The models with each ``lora_path`` resolved as ``model_path``; ConfigError naming the
    key if one is not a PEFT LoRA adapter's folder of a rank vLLM serves."""
    from worker.engine.lora import AdapterError, adapter_rank

    out = dict(models)
    for name, entry in models.items():
        if entry.lora_path is None:
            continue
        key = f'queue.models."{name}".lora_path'
        folder = _folder(path, key, entry.lora_path, "an adapter folder")
        try:
            adapter_rank(folder)
        except AdapterError as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
        out[name] = entry.model_copy(update={"lora_path": folder})
    return out


def _folder(path: Path, key: str, value: Path, expected: str) -> Path:
    """``value`` of ``key`` resolved against the config file ``path``
    (:func:`_resolve_model_path`); ConfigError naming the key and what was ``expected`` if it
    is not an existing folder."""
    folder = _resolve_model_path(path.resolve().parent, value)
    if not folder.is_dir():
        raise ConfigError(
            f"{path}: {key}: expected {expected}, {folder} does not exist or is not a directory"
        )
    return folder


def _check_lora_support(path: Path, cfg: Config) -> None:
    """ConfigError naming the first ``lora_path`` if the model class vLLM serves the
    checkpoint with does not support LoRA (imports vLLM; nothing to check without one)."""
    named = [name for name, entry in cfg.queue.models.items() if entry.lora_path is not None]
    if not named:
        return
    from worker.engine.lora import unsupported_model_class

    unsupported = unsupported_model_class(cfg.generator.served_architectures())
    if unsupported is not None:
        raise ConfigError(
            f'{path}: queue.models."{named[0]}".lora_path: vLLM serves this checkpoint as '
            f"{unsupported}, which does not support LoRA adapters"
        )


def _check_models(path: Path, cfg: Config) -> None:
    """At least one ``[queue.models."<name>"]``, each advertising the generator's task; an
    in-process engine core only for an engine of one rank."""
    gen = cfg.generator
    ranks = gen.tensor_parallel_size * gen.pipeline_parallel_size
    if gen.engine_core in ("thread", "process") and ranks > 1:
        raise ConfigError(
            f'{path}: generator.engine_core: "{gen.engine_core}" runs vLLM\'s LLMEngine with '
            f"its model in one process, for one rank only; tensor_parallel_size = "
            f"{gen.tensor_parallel_size} and pipeline_parallel_size = "
            f'{gen.pipeline_parallel_size} need "asyncllm" (or "auto")'
        )
    if not cfg.queue.models:
        raise ConfigError(
            f'{path}: queue.models: expected at least one [queue.models."<name>"] table'
        )
    want = cfg.generator.task
    if want == "embed" and cfg.generator.score_type not in (None, "bi-encoder"):
        raise ConfigError(
            f'{path}: generator.score_type: expected "bi-encoder" or no value with '
            f'generator.task = "embed" (an embedding engine scores pairs by cosine); '
            f'"{cfg.generator.score_type}" needs generator.task = "score"'
        )
    known = bool(gen.checkpoint_config().get("architectures"))  # else vLLM tells at start
    beside = want != "embed_sparse" and known and gen.sparse_architecture() != BGE_M3
    for name, entry in cfg.queue.models.items():
        if beside and "embed_sparse" in entry.tasks():
            raise ConfigError(
                f'{path}: queue.models."{name}".sparse_embedding_task.supported: sparse '
                f'embeddings beside generator.task = "{want}" need a BGE-M3 checkpoint '
                "(an XLMRobertaModel with sparse_linear.pt); a SPLADE model needs "
                'generator.task = "embed_sparse"'
            )
    if want == "embed_sparse" and gen.sparse_architecture() is None:
        raise ConfigError(
            f'{path}: generator.task: "embed_sparse" needs a SPLADE checkpoint (architectures '
            f"{', '.join(SPARSE_ARCHITECTURES)}); {gen.model_path}/config.json names "
            f"{gen.checkpoint_config().get('architectures') or 'none'}"
        )
    for name, entry in cfg.queue.models.items():
        if want not in entry.tasks():
            table = TASK_TABLES[want]
            raise ConfigError(
                f'{path}: queue.models."{name}".{table}.supported: expected true, because '
                f'generator.task = "{want}" (this model advertises: {entry.tasks() or "nothing"})'
            )


def _token(path: Path, configured: str | None, environ: Mapping[str, str]) -> str:
    """The queue token by precedence (see :func:`load_config`); ConfigError if there is none
    or the token file cannot be read."""
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    token_file = environ.get(TOKEN_FILE_ENV)
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"{path}: queue.token: ${TOKEN_FILE_ENV} names {token_file}, "
                f"which cannot be read: {reason}"
            ) from None
        if token:
            return token
        raise ConfigError(
            f"{path}: queue.token: ${TOKEN_FILE_ENV} names {token_file}, which is empty"
        )
    if configured:
        return configured
    raise ConfigError(
        f"{path}: queue.token: required key is missing (or set ${TOKEN_ENV}, "
        f"or ${TOKEN_FILE_ENV} to a readable file holding it)"
    )


def _resolve_model_path(base: Path, value: Path) -> Path:
    """``pkg:<module>[/<sub/folder>]`` is a folder inside an installed Python package;
    other relative paths are relative to the config file's folder."""
    text = str(value)
    if text.startswith("pkg:"):
        module, _, sub = text[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return Path(text)  # reported by check_model_paths
        return Path(next(iter(spec.submodule_search_locations))) / sub
    return (base / value).resolve()

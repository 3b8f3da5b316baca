"""Worker configuration: the Pharia inference-worker ``config.toml``, edition 1.

The file format is the one documented for Pharia's vLLM worker (see
``docs/configuration.md``); this module adds optional keys an operator of vLLM
expects (``dtype``, ``gpu_memory_utilization``, ``engine_args`` ...), each with
vLLM's own default when absent.

``load_config(path)`` returns a validated :class:`Config`; it raises
:class:`ConfigError` whose message names the file, the key path
(``generator.max_num_seqs``) and what was expected.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from worker import prompts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Environment variable that overrides ``queue.token`` so secrets stay out of files.
TOKEN_ENV = "INFERENCE_WORKER_QUEUE_TOKEN"
#: Environment variable naming a file that holds the token (e.g. a mounted Kubernetes Secret).
TOKEN_FILE_ENV = "INFERENCE_WORKER_QUEUE_TOKEN_FILE"


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` names the file and the key path."""


#: Paths come from TOML strings; everything else must have its TOML type exactly.
LaxPath = Annotated[Path, Field(strict=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GeneratorConfig(_Strict):
    """``[generator]``: the vLLM engine."""

    type: Literal["vllm"] = "vllm"
    model_path: LaxPath
    #: ``embed``: pooled embeddings. ``score``: logits of chosen token ids at the last position.
    task: Literal["embed", "score"] = "embed"
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=256, gt=0)
    pipeline_parallel_size: int = Field(default=1, gt=0)
    tensor_parallel_size: int = Field(default=1, gt=0)
    # Extensions (optional; vLLM's default when absent).
    dtype: Literal["auto", "float32", "float16", "bfloat16", "half", "float"] = "auto"
    gpu_memory_utilization: Annotated[float, Field(strict=False)] | None = Field(default=None, gt=0, le=1)
    tokenizer_path: LaxPath | None = None
    enforce_eager: bool | None = None
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    enable_prefix_caching: bool | None = None
    trust_remote_code: bool = False
    #: Any other ``vllm.AsyncEngineArgs`` field, passed through unchanged
    #: (e.g. ``block_size``, ``hf_overrides``, ``distributed_executor_backend``).
    engine_args: dict[str, Any] = Field(default_factory=dict)


class EmbeddingTask(_Strict):
    """``[queue.models."<name>".embedding_task]``."""

    supported: bool = False


#: Qwen3-Reranker's instruction and prompt (from its model card); ``{instruction}``,
#: ``{query}`` and ``{document}`` are filled in per document.
QWEN3_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


class ScoringTask(_Strict):
    """``[queue.models."<name>".scoring_task]``: ``return_logits`` scoring and ``/v1/rerank``.

    Rerank scores a document as P(``rerank_true_token``) from the softmax over the logits of
    (``rerank_false_token``, ``rerank_true_token``) after the prompt ``rerank_template``.
    The two tokens are resolved to ids with the model's own tokenizer when the worker starts.
    """

    supported: bool = False
    rerank_instruction: str = QWEN3_RERANK_INSTRUCTION
    rerank_template: str = QWEN3_RERANK_TEMPLATE
    rerank_true_token: str = "yes"
    rerank_false_token: str = "no"

    @field_validator("rerank_template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            used = prompts.fields_used(v)
        except prompts.TemplateError as e:
            raise ValueError(f"expected a prompt template: {e}") from None
        for name in ("query", "document"):
            if name not in used:
                raise ValueError(f"expected a template containing {{{name}}}")
        return v


class ModelEntry(_Strict):
    """``[queue.models."<name>"]``: a model name this worker serves, as clients call it."""

    maximum_completion_tokens: int | None = Field(default=None, ge=0)
    description: str = ""
    embedding_task: EmbeddingTask = EmbeddingTask()
    scoring_task: ScoringTask = ScoringTask()

    def tasks(self) -> list[str]:
        """Task names advertised to the queue (``embed``, ``score``)."""
        out = []
        if self.embedding_task.supported:
            out.append("embed")
        if self.scoring_task.supported:
            out.append("score")
        return out


class QueueConfig(_Strict):
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
    #: Timeout of one HTTP call to the queue, seconds (pulls add ``pull_wait_seconds``).
    http_timeout_seconds: Annotated[float, Field(strict=False)] = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")


class MonitoringConfig(_Strict):
    """``[monitoring]``: Prometheus metrics and probes."""

    metrics_port: int = Field(default=4000, ge=0, le=65535)
    #: Extra TCP ports to listen on that accept and close connections while the worker is
    #: alive, for TCP liveness probes.
    tcp_probes: list[int] = Field(default_factory=list)
    metrics_host: str = "0.0.0.0"
    #: How vLLM's engine metrics are named on ``/metrics``: ``"prometheus"`` renames
    #: ``vllm:x`` to ``vllm_x`` (Prometheus naming conventions; ``promtool check metrics``
    #: passes), ``"upstream"`` keeps vLLM's own ``vllm:x`` names (for vLLM's dashboards).
    vllm_metric_names: Literal["prometheus", "upstream"] = "prometheus"


class Config(_Strict):
    """The whole file. Edition 1 is the only one."""

    edition: Literal[1]
    generator: GeneratorConfig
    queue: QueueConfig
    monitoring: MonitoringConfig = MonitoringConfig()
    #: Seconds to finish in-flight items after SIGTERM before handing the rest back.
    drain_timeout_seconds: Annotated[float, Field(strict=False)] = Field(default=30.0, ge=0)
    _source: Path = PrivateAttr(default=Path("config.toml"))

    @property
    def token(self) -> str:
        """The queue token: ``$INFERENCE_WORKER_QUEUE_TOKEN``, else the contents of the file
        named by ``$INFERENCE_WORKER_QUEUE_TOKEN_FILE`` (stripped), else ``queue.token``."""
        if os.environ.get(TOKEN_ENV):
            return os.environ[TOKEN_ENV]
        if os.environ.get(TOKEN_FILE_ENV):
            try:
                return Path(os.environ[TOKEN_FILE_ENV]).read_text(encoding="utf-8").strip()
            except OSError:
                return ""
        return self.queue.token or ""


def _key_path(loc: tuple[Any, ...]) -> str:
    parts = []
    for p in loc:
        s = str(p)
        parts.append(s if s.replace("_", "").isalnum() else f'"{s}"')
    return ".".join(parts)


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    return f"{err['msg']} (got {got!r})"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a worker config file.

    Relative ``model_path`` / ``tokenizer_path`` are resolved against the file's folder;
    ``pkg:<module>`` names the folder of an installed Python package that ships a model.
    Raises :class:`ConfigError` (message: ``<file>: <key.path>: <what was expected>``) for an
    unreadable file, invalid TOML, an unknown key, a wrong type, a missing required key, a
    missing queue token, or a model that does not advertise the generator's task.
    Paths are checked separately by :func:`check_model_paths`.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: {_key_path(err['loc'])}: {_describe(err)}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None

    base = path.resolve().parent
    gen = cfg.generator
    updates: dict[str, Any] = {"model_path": _resolve_model_path(base, gen.model_path)}
    if gen.tokenizer_path is not None:
        updates["tokenizer_path"] = _resolve_model_path(base, gen.tokenizer_path)
    cfg = cfg.model_copy(update={"generator": gen.model_copy(update=updates)})
    cfg._source = path

    if not cfg.token:
        raise ConfigError(f"{path}: queue.token: required key is missing (or set ${TOKEN_ENV}, "
                          f"or ${TOKEN_FILE_ENV} to a readable file holding it)")
    if not cfg.queue.models:
        raise ConfigError(f'{path}: queue.models: expected at least one [queue.models."<name>"] table')
    want = cfg.generator.task
    for name, entry in cfg.queue.models.items():
        if want not in entry.tasks():
            table = "embedding_task" if want == "embed" else "scoring_task"
            raise ConfigError(
                f'{path}: queue.models."{name}".{table}.supported: expected true, because '
                f'generator.task = "{want}" (this model advertises: {entry.tasks() or "nothing"})'
            )
    return cfg


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


def check_model_paths(cfg: Config) -> None:
    """Fail fast, before vLLM starts, when ``model_path`` / ``tokenizer_path`` is not a folder.

    Raises :class:`ConfigError` naming the file and the key.
    """
    for key in ("model_path", "tokenizer_path"):
        value = getattr(cfg.generator, key)
        if value is not None and not Path(value).is_dir():
            raise ConfigError(
                f"{cfg._source}: generator.{key}: expected a model directory, "
                f"{value} does not exist or is not a directory"
            )

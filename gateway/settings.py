"""How the gateway runs: :class:`GatewaySettings`, defined once; the ``inference-gateway`` flags
and the ``GATEWAY_*`` environment are built from its fields.

Each setting has a flag and an environment variable (``GATEWAY_<NAME>``; lists are
comma-separated there and the flag repeats). A flag wins over the environment, the environment
over the default.
"""

from __future__ import annotations

import argparse
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


def _setting(
    default: Any, flag: str, help: str, *, env: str | None = None, **constraints: Any
) -> Any:
    return Field(
        default, description=help, json_schema_extra={"flag": flag, "env": env}, **constraints
    )


class GatewaySettings(BaseModel):
    """Every setting of ``inference-gateway``; see ``--help`` and the README."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    host: str = _setting("127.0.0.1", "--host", "address to listen on")
    port: int = _setting(8000, "--port", "port to listen on", ge=0, le=65535)
    api_keys: list[str] = _setting(
        [],
        "--api-key",
        "client API key (repeatable; on the command line it is visible to every user of the "
        "host: prefer --api-key-file or the environment)",
    )
    api_key_file: str | None = _setting(
        None, "--api-key-file", "a file of client API keys, one per line ('#' comments)"
    )
    worker_tokens: list[str] = _setting(
        [],
        "--worker-token",
        "worker token for every model (repeatable; prefer --worker-token-file or the environment)",
    )
    worker_token_file: str | None = _setting(
        None,
        "--worker-token-file",
        "a file of worker tokens, one per line: 'TOKEN' (any model) or 'TOKEN MODEL [MODEL ...]' "
        "(pulls for other models are refused with 403)",
    )
    models: list[str] = _setting(
        [],
        "--model",
        "accept requests for this model before any worker advertises it "
        "(repeatable; requests wait for a worker)",
    )
    default_model: str | None = _setting(
        None,
        "--default-model",
        "the model of a request that names none (TEI's routes: /embed, /rerank, /predict, "
        "/info); unset: the only model served, else such a request is a 400",
        max_length=256,
    )
    lease_seconds: float = _setting(
        30.0, "--lease-seconds", "lease (visibility timeout) of a pulled item, seconds", gt=0
    )
    max_attempts: int = _setting(
        3, "--max-attempts", "deliveries of one item before it is dead-lettered", ge=1
    )
    pickup_timeout_seconds: float = _setting(
        30.0,
        "--pickup-timeout",
        "503 if no worker takes any input of a request within this many seconds",
        gt=0,
    )
    request_timeout_seconds: float = _setting(
        600.0,
        "--request-timeout",
        "504 if a taken request is not answered within this many seconds",
        gt=0,
    )
    worker_ttl_seconds: float = _setting(
        30.0, "--worker-ttl", "a worker counts as live this long after its last pull", gt=0
    )
    queue_url: str = _setting(
        "memory",
        "--queue-url",
        "the queue store: 'memory' (in this process, the default) or a Redis URL "
        "(redis://[:password@]host:port/db, rediss:// for TLS, unix:///path/redis.sock?db=0 "
        "for a Redis on this host; redis+cluster://host:port, rediss+cluster://, for any node "
        "of a Redis Cluster) shared by gateway replicas",
    )
    queue_password_file: str | None = _setting(
        None, "--queue-password-file", "a file holding the Redis password (wins over the URL's)"
    )
    max_queued_inputs: int = _setting(
        50_000,
        "--max-queued-inputs",
        "unanswered interactive inputs (waiting or leased) per model; a request that would "
        "pass it gets 429 and nothing of it is queued",
        ge=1,
    )
    max_queued_batch_inputs: int = _setting(
        50_000,
        "--max-queued-batch-inputs",
        "unanswered inputs of batch jobs per model, counted apart from interactive ones (a "
        "batch never takes their room); a batch waits for room",
        ge=1,
    )
    advert_ttl_seconds: float = _setting(
        3600.0,
        "--advert-ttl",
        "a model no worker has pulled for this many seconds is forgotten (404; its empty "
        "queue lines dropped), unless declared with --model",
        gt=0,
    )
    drain_timeout_seconds: float = _setting(
        30.0,
        "--drain-timeout",
        "after SIGTERM: seconds to keep serving workers and waiting clients (readiness 503, "
        "no new client requests) before exiting",
        ge=0,
    )
    max_body_bytes: int = _setting(
        64 * 1024 * 1024,
        "--max-body-bytes",
        "largest request body, bytes (413 above it, before any of it is parsed); the default "
        "fits 2,048 inputs of 8,192 tokens at 4 bytes per token",
        ge=1024,
    )
    max_chars_per_token: int = _setting(
        16,
        "--max-chars-per-token",
        "a text longer than the model's max_model_len times this many characters is a 400 "
        "before it is queued (also with truncation: such a text is no use)",
        ge=1,
    )
    max_rerank_bytes: int = _setting(
        64 * 1024 * 1024,
        "--max-rerank-bytes",
        "a rerank's prompts in total (query and instruction copied into every document), "
        "bytes; 400 above it",
        ge=1024,
    )
    body_timeout_seconds: float = _setting(
        30.0,
        "--body-timeout",
        "a request whose body has not fully arrived this many seconds after its headers gets "
        "408 and its connection is closed",
        gt=0,
    )
    header_timeout_seconds: float = _setting(
        10.0,
        "--header-timeout",
        "a connection that has not sent a whole request head this many seconds after it "
        "opened (or after its last response) is closed",
        gt=0,
    )
    max_connections: int = _setting(
        2048,
        "--max-connections",
        "open connections per listener; at the limit a new connection closes the one idle "
        "longest (between requests, or not yet a whole request head), and gets 503 only "
        "when every connection is serving a request",
        ge=1,
    )
    write_timeout_seconds: float = _setting(
        30.0,
        "--write-timeout",
        "a connection whose client has not taken any of its answer for this many seconds "
        "(the send buffer full) is closed",
        gt=0,
    )
    internal_port: int | None = _setting(
        None,
        "--internal-port",
        "a second listener (same --host) for workers and probes only: the queue routes, "
        "/healthz, /readyz, /metrics, with a connection budget of its own (client routes "
        "404 there); point workers, probes and Prometheus at it",
        ge=0,
        le=65535,
    )
    files_dir: str = _setting(
        "inference-files",
        "--files-dir",
        "directory of the Files API's files and of running batches' partial output (several "
        "replicas: a volume they share)",
    )
    max_file_bytes: int = _setting(
        200 * 1024 * 1024,
        "--max-file-bytes",
        "largest file upload, bytes (413 above it), as OpenAI's Files API",
        ge=1024,
    )
    max_files_per_key: int = _setting(
        10_000,
        "--max-files-per-key",
        "files one API key may keep (uploads and batch outputs); 429 above it",
        ge=1,
    )
    max_file_bytes_per_key: int = _setting(
        10 * 1024**3,
        "--max-file-bytes-per-key",
        "bytes of files one API key may keep; 429 above it",
        ge=1024,
    )
    file_expiry_seconds: float = _setting(
        30 * 86400.0,
        "--file-expiry",
        "a file is deleted this many seconds after it was made, unless its upload asked for "
        "less (OpenAI's expires_after)",
        gt=0,
    )
    max_batch_lines: int = _setting(
        50_000, "--max-batch-lines", "requests (lines) per batch input file, as OpenAI's", ge=1
    )
    max_batches_per_key: int = _setting(
        4,
        "--max-batches-per-key",
        "batches one API key may have running (validating to finalizing); 429 above it",
        ge=1,
    )
    max_batch_records_per_key: int = _setting(
        1000,
        "--max-batch-records-per-key",
        "batch records one API key keeps; a new batch forgets the key's oldest ended ones "
        "past it, with their output files",
        ge=1,
    )
    batch_retention_seconds: float = _setting(
        30 * 86400.0,
        "--batch-retention",
        "an ended batch's record and output files are deleted this many seconds after it ended",
        gt=0,
    )
    max_batch_line_bytes: int = _setting(
        8 * 1024 * 1024,
        "--max-batch-line-bytes",
        "largest line of a batch input file, bytes: a longer line is that line's error "
        "(413), never parsed",
        ge=1024,
    )
    batch_inputs_in_flight: int = _setting(
        4096,
        "--batch-inputs-in-flight",
        "inputs of one batch in the queue at once (waiting or leased): enough to keep idle "
        "workers busy, few enough that a cancel or a restart loses little",
        ge=1,
    )
    log_level: str = _setting("info", "--log-level", "uvicorn's log level", env="LOG_LEVEL")

    @field_validator("queue_url")
    @classmethod
    def _known_store(cls, url: str) -> str:
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        if url != "memory" and not url.startswith(schemes):
            raise ValueError(f"expected 'memory' or a Redis URL ({', '.join(schemes)})")
        password = queue_url_password(url)
        if password is not None:
            check_not_placeholder(password, "the URL's password")
        return url

    @field_validator("api_keys", "worker_tokens")
    @classmethod
    def _strong(cls, secrets: list[str]) -> list[str]:
        for secret in secrets:
            check_secret(secret)
        return secrets

    @field_validator("api_key_file", "worker_token_file")
    @classmethod
    def _secrets_file(cls, path: str | None) -> str | None:
        if path is not None:
            for secret, _ in read_secrets_file(path):
                check_secret(secret, path)
        return path

    @model_validator(mode="after")
    def _some_credentials(self) -> GatewaySettings:
        if not (self.api_keys or self.api_key_file):
            raise ValueError(
                "no client API key: give --api-key-file, $GATEWAY_API_KEYS or --api-key"
            )
        if not (self.worker_tokens or self.worker_token_file):
            raise ValueError(
                "no worker token: give --worker-token-file, $GATEWAY_WORKER_TOKENS or "
                "--worker-token"
            )
        return self

    @field_validator("queue_password_file")
    @classmethod
    def _readable(cls, path: str | None) -> str | None:
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    check_not_placeholder(f.read().strip(), path)
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read {path}: {e}") from None
        return path


#: Shortest API key or worker token accepted.
MIN_SECRET_LENGTH = 16
#: Values that are placeholders, not secrets (deploy/k8s/base/secret.yaml).
PLACEHOLDER_PREFIXES = ("REPLACE-with", "change-me", "changeme")


def check_not_placeholder(secret: str, where: str = "") -> None:
    """Raises ValueError (never quoting the secret) for a placeholder value of the manifests
    (``deploy/k8s``)."""
    if secret.startswith(PLACEHOLDER_PREFIXES):
        at = f" in {where}" if where else ""
        raise ValueError(
            f"a placeholder{at} (from the manifests in deploy/k8s?) is not a secret: "
            "generate one, e.g. openssl rand -hex 24"
        )


def queue_url_password(url: str) -> str | None:
    """The password a Redis URL carries (``redis://:PASSWORD@host``), or None."""
    if url == "memory":
        return None
    password = urllib.parse.urlsplit(url).password
    return urllib.parse.unquote(password) if password else None


def check_secret(secret: str, where: str = "") -> None:
    """Raises ValueError (never quoting the secret) for a placeholder value or one shorter
    than :data:`MIN_SECRET_LENGTH` characters."""
    at = f" in {where}" if where else ""
    check_not_placeholder(secret, where)
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"a key or token{at} has {len(secret)} characters; at least {MIN_SECRET_LENGTH} "
            "are required (e.g. openssl rand -hex 24)"
        )


def read_secrets_file(path: str) -> list[tuple[str, list[str]]]:
    """The lines of a key or token file: ``(secret, [model, ...])`` per non-blank line, '#'
    comments skipped. Raises ValueError naming the path and the OS error if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read {path}: {reason}") from None
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out.append((words[0], words[1:]))
    if not out:
        raise ValueError(f"{path} holds no key or token")
    return out


def _env_name(name: str, extra: dict[str, Any]) -> str:
    return extra.get("env") or f"GATEWAY_{name.upper()}"


def parser() -> argparse.ArgumentParser:
    """``inference-gateway``'s argument parser, one flag per :class:`GatewaySettings` field."""
    p = argparse.ArgumentParser(
        prog="inference-gateway",
        description="The reference queue and OpenAI-compatible front door.",
        epilog="Every flag can be set in the environment instead: GATEWAY_<NAME> (e.g. "
        "GATEWAY_API_KEYS=k1,k2, GATEWAY_PICKUP_TIMEOUT_SECONDS=300).",
    )
    for name, field in GatewaySettings.model_fields.items():
        extra: dict[str, Any] = field.json_schema_extra  # type: ignore[assignment]
        is_list = field.annotation == list[str]
        help_text = f"{field.description} (env {_env_name(name, extra)}; default {field.default!r})"
        p.add_argument(
            extra["flag"],
            dest=name,
            default=None,
            help=help_text,
            action="append" if is_list else "store",
        )
    return p


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Settings from flags, then the environment, then the defaults.

    Raises ``SystemExit(2)`` with a message naming the flag and environment variable of each
    bad or missing setting (argparse's own exit for unknown flags)."""
    environ = os.environ if environ is None else environ
    p = parser()
    args = vars(p.parse_args(argv))
    values: dict[str, Any] = {}
    for name, field in GatewaySettings.model_fields.items():
        extra: dict[str, Any] = field.json_schema_extra  # type: ignore[assignment]
        env = environ.get(_env_name(name, extra), "").strip()
        if args[name] is not None:
            values[name] = args[name]
        elif env:
            values[name] = (
                [v.strip() for v in env.split(",") if v.strip()]
                if field.annotation == list[str]
                else env
            )
    try:
        return GatewaySettings.model_validate(values)
    except ValidationError as e:
        lines = []
        for err in e.errors(include_input=False):
            msg = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a rule across settings
                lines.append(msg)
                continue
            name = str(err["loc"][0])
            extra = GatewaySettings.model_fields[name].json_schema_extra  # type: ignore[assignment]
            lines.append(f"{extra['flag']} / ${_env_name(name, extra)}: {msg}")
        p.exit(2, "inference-gateway: " + "\ninference-gateway: ".join(lines) + "\n")
    raise AssertionError("unreachable")  # pragma: no cover

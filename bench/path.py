"""The serving path alone, with a NULL ENGINE (``bench/null_worker.py``: the real worker, its
engine answering every input at once with a fixed vector; bench only): what the gateway, the
queue and the worker cost per input, the ceiling a GPU meets once the model is fast.

    python bench/path.py [--rounds 3] [--big 32000] [--small 4000] [--profile 8]
                         [--skip memory,two-workers,redis,redis-unix,replicas,cluster]
                         [--no-save] [--ab REV] [--name path]

Stacks (every one: real ``inference-gateway`` processes, NULL-ENGINE workers, aiohttp clients
in this process): the memory store with one worker and with two; the Redis store with one
gateway and one worker, over loopback TCP and over a Unix socket (``unix://``, a Redis on
the gateway's host), and with two gateway replicas on one Redis, a worker pulling through
each and the clients split over both; the Redis store on a Redis Cluster of three primaries
(``redis+cluster://``; redis-server = the three nodes), one gateway and one worker.
Patterns: 64 inputs per request (8 in flight) and one input per request (64 clients). Per
measurement the CPU seconds of each role (gateway, worker, redis-server, and the client, this
process) are read with psutil and given per 1,000 inputs; 1,000 / that is the role's inputs/s
per core. All roles share this host's cores, so inputs/s is capped by their sum; CPU per input
is the figure that carries to a bigger host.
``--profile S``: afterwards, ``py-spy`` samples each role for S seconds under each pattern of
the first stack and the top frames by own time are printed (and saved).
``--ab REV``: an interleaved A/B in one invocation. Every stack runs twice, once on commit REV
(``git archive`` into a temp folder, imported first through ``PYTHONPATH``) and once on this
tree, both up for the whole run; each measurement is taken of both builds back to back, in an
order that alternates by round, so the VM's slow minutes hit both alike. Prints the ratios this
tree / REV (inputs/s and inputs/s per core by role, median of the rounds' ratios).
Afterwards the worker's tokenization alone (its ``Preparer``, one thread, in this process) is
timed on the same texts, 64 and 1 per call: the floor under the worker's CPU per input.
Prints the tables; saves ``bench/results/path.json`` (``path-ab.json`` with ``--ab``; another
name with ``--name``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import record
import suite
from suite import Stack, _pid, http_load

from devstack import localstack as ls

LABEL = "NULL ENGINE (bench only)"
#: py-spy beside this Python (the bench extra installs it), else on PATH.
PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
PATTERNS = {"64/request": (64, 8), "1/request": (1, 64)}
ROLES = ("gateway", "worker", "redis-server", "client")
MEMORY, TWO, REDIS, REDIS_UNIX, REPLICAS, CLUSTER = (
    "memory store, 1 worker",
    "memory store, 2 workers",
    "Redis store, 1 gateway",
    "Redis store over a Unix socket, 1 gateway",
    "Redis store, 2 gateway replicas",
    "Redis Cluster (3 primaries), 1 gateway",
)


HERE = Path(__file__).resolve().parent
_N = itertools.count(1)  # log file names of the workers


def null_worker(
    queue_url: str,
    logs: Path,
    name: str,
    tree: Path = HERE.parent,
    env: dict[str, str] | None = None,
) -> ls.Proc:
    """A NULL-ENGINE worker (``bench/null_worker.py`` of ``tree``, ``env`` added to its
    environment) on the bundled model's tokenizer."""
    text = ls.worker_config(queue_url=queue_url, max_model_len=512, max_num_seqs=256)
    cfg = logs / f"{name}.toml"
    cfg.write_text(text)
    port = ls.Config.model_validate(ls.tomllib.loads(text)).monitoring.metrics_port
    url = f"http://127.0.0.1:{port}"
    script = tree / "bench" / "null_worker.py"
    return ls.start(
        [sys.executable, str(script), "--config", str(cfg)],
        logs / f"{name}.log",
        url=url,
        ready=url + "/readyz",
        timeout=60,
        env={"INFERENCE_WORKER_QUEUE_TOKEN": ls.WORKER_TOKEN, **(env or {})},
    )


class Path_:
    """One stack: its client URLs and processes by role."""

    def __init__(self, name: str, urls: list[str], stack: Stack) -> None:
        self.name, self.urls, self.stack = name, urls, stack
        self.rounds: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)

    async def measure(self, pattern: str, texts: list[str]) -> None:
        per, conc = PATTERNS[pattern]
        me = psutil.Process()
        marks: list[dict[str, float]] = []

        def start() -> None:
            marks.append({**self.stack.snapshot(), "client": suite._cpu(me)})

        sec, _ = await http_load(self.urls, ls.API_KEY, texts, per, conc, start)
        after = {**self.stack.snapshot(), "client": suite._cpu(me)}
        cpu = {r: after[r] - marks[0].get(r, 0.0) for r in after}
        self.rounds[pattern].append({"seconds": sec, "inputs": len(texts), "cpu_s": cpu})
        print(f"  {self.name} | {pattern}: {len(texts) / sec:,.0f} inputs/s", flush=True)

    def summary(self, pattern: str) -> dict[str, Any]:
        rounds = self.rounds[pattern]
        rates = [r["inputs"] / r["seconds"] for r in rounds]
        per_1k = {
            role: statistics.median(r["cpu_s"].get(role, 0.0) * 1000 / r["inputs"] for r in rounds)
            for role in ROLES
            if any(role in r["cpu_s"] for r in rounds)
        }
        return {
            "inputs_per_s": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "cpu_s_per_1k": per_1k,
            "per_core": {role: 1000 / v for role, v in per_1k.items() if v > 0},
        }


def profile(paths: dict[str, Any], seconds: float, out: Path) -> dict[str, list[tuple[str, float]]]:
    """py-spy samples of each role's process under each pattern: top frames by own time."""
    first = next(iter(paths.values()))
    procs = {role: p for role, p in first.stack.procs if role in ("gateway", "worker")}
    tops: dict[str, list[tuple[str, float]]] = {}
    for pattern in PATTERNS:
        texts = paths["_texts"][pattern]
        for role, proc in procs.items():
            raw = out / f"{role}-{pattern.replace('/', '-per-')}.txt"
            spy = subprocess.Popen(
                [PY_SPY, "record", "-p", str(proc.pid), "-d", str(int(seconds)), "-r", "200",
                 "--format", "raw", "-o", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + seconds

            async def load(t: list[str] = texts, pat: str = pattern, end: float = deadline) -> None:
                while time.monotonic() < end:
                    await first.measure(pat, t)

            asyncio.run(load())
            spy.wait(60)
            tops[f"{role}, {pattern}"] = top_frames(raw)
    return tops


def top_frames(raw: Path, n: int = 12) -> list[tuple[str, float]]:
    """(frame, share of samples) of the ``n`` frames with the most own time in a py-spy raw
    (collapsed stacks) file."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        total += k
        own[stack.split(";")[-1]] += k
    return [(frame, k / total) for frame, k in own.most_common(n)] if total else []


def tokenizer_alone(texts: list[str], per_call: int) -> float:
    """CPU seconds per 1,000 inputs of the worker's own tokenization alone
    (:meth:`worker.engine.prepare.Preparer.encode_texts`, the model's real tokenizer, one
    thread as on a CPU host), ``per_call`` texts per call, in this process: the floor under
    the worker's CPU per input, whatever the path around it costs."""
    from transformers import AutoTokenizer

    from worker.engine.prepare import Preparer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read at each call: one thread
    preparer = Preparer(AutoTokenizer.from_pretrained(ls.minilm_path()), "bi-encoder", False, 0)
    preparer.encode_texts(texts[:per_call])  # the backend looked up once, as in the worker
    started = time.process_time()
    for i in range(0, len(texts), per_call):
        preparer.encode_texts(texts[i : i + per_call])
    return (time.process_time() - started) / len(texts) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big", type=int, default=32000, help="inputs of the 64/request pattern")
    ap.add_argument("--small", type=int, default=4000, help="inputs of the 1/request pattern")
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--profile", type=float, default=0, help="py-spy seconds per role, 0: none")
    ap.add_argument("--skip", default="")
    ap.add_argument("--no-save", action="store_true", help="print only (bench/results untouched)")
    ap.add_argument("--name", default="path", help="bench/results/<name>.json (-ab with --ab)")
    ap.add_argument("--ab", default="", metavar="REV", help="interleaved A/B against commit REV")
    a = ap.parse_args()
    suite._env()
    skip = set(filter(None, a.skip.split(",")))
    sents = ls.stsb_sentences(("dev", "train"))
    texts = {
        "64/request": [sents[i % len(sents)] + f" #{i}" for i in range(a.big)],
        "1/request": [sents[i % len(sents)] + f" #{i}" for i in range(a.small)],
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-path-"))
    print(f"logs: {logs}", flush=True)
    paths: dict[str, Any] = {}
    builds: list[tuple[str, Path | None]] = [("", None)]
    if a.ab:
        builds = [(f" [{a.ab}]", checkout(a.ab, logs)), (" [this tree]", None)]
    try:
        for suffix, tree in builds:
            env = importing(tree)
            for name, p in start_stacks(logs, skip, tree or HERE.parent, env).items():
                paths[name + suffix] = p

        async def rounds() -> None:
            # the builds of one stack side by side: [[stack on build 1, on build 2], ...]
            groups = [list(paths.values())[i :: len(builds)] for i in range(len(builds))]
            stacks = [list(g) for g in zip(*groups, strict=True)]
            for rnd in range(a.rounds):
                print(f"round {rnd + 1} of {a.rounds} ({LABEL})", flush=True)
                for same in stacks[rnd % len(stacks) :] + stacks[: rnd % len(stacks)]:
                    for pattern in PATTERNS:
                        for p in same[::-1] if rnd % 2 else same:
                            await asyncio.sleep(a.settle)
                            await p.measure(pattern, texts[pattern])

        asyncio.run(rounds())
        results = {name: {pat: p.summary(pat) for pat in PATTERNS} for name, p in paths.items()}
        tops: dict[str, Any] = {}
        if a.profile > 0 and paths:
            paths["_texts"] = texts
            tops = profile(paths, a.profile, logs)
            del paths["_texts"]
    finally:
        for proc in ls.leftovers():
            proc.stop()
    floor = {pattern: tokenizer_alone(texts[pattern], n) for pattern, (n, _) in PATTERNS.items()}
    report(results, tops, floor)
    data: dict[str, Any] = {"label": LABEL, "results": results, "profiles": tops, "args": vars(a)}
    data["tokenizer_alone_cpu_s_per_1k"] = floor
    if a.ab:
        data["ab"] = ab_report(paths, a.ab)
    if not a.no_save:
        record.write(f"{a.name}-ab" if a.ab else a.name, data)
    return 0


def checkout(rev: str, logs: Path) -> Path:
    """Commit ``rev`` of this repository as files in a folder under ``logs``."""
    tree = logs / "ab-tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def importing(tree: Path | None) -> dict[str, str]:
    """The environment that makes a started process import the project's packages from
    ``tree`` (None: as installed): its folder first on ``PYTHONPATH``, before the editable
    install's finder."""
    if tree is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}


def start_stacks(logs: Path, skip: set[str], tree: Path, env: dict[str, str]) -> dict[str, Path_]:
    """The stacks not in ``skip``, their processes started with ``env`` added (the workers'
    script from ``tree``)."""
    paths: dict[str, Path_] = {}
    if "memory" not in skip:
        gw = ls.start_gateway(logs, args=["--pickup-timeout", "600"], env=env)
        wk = null_worker(gw.url, logs, f"null-worker-{next(_N)}", tree, env)
        paths[MEMORY] = Path_(
            MEMORY, [gw.url], Stack().add("gateway", _pid(gw)).add("worker", _pid(wk))
        )
    if "two-workers" not in skip:
        gw = ls.start_gateway(logs, args=["--pickup-timeout", "600"], env=env)
        stack = Stack().add("gateway", _pid(gw))
        for _ in range(2):
            stack.add(
                "worker", _pid(null_worker(gw.url, logs, f"null-worker-{next(_N)}", tree, env))
            )
        paths[TWO] = Path_(TWO, [gw.url], stack)
    # Each Redis stack has its own redis-server: workers on one Redis share its queue,
    # and a worker outside a stack would do part of its work uncounted.
    # One gateway and one worker, reaching redis-server over loopback TCP, then through its
    # Unix socket (a Redis on the gateway's host).
    for name, key, unix_socket in ((REDIS, "redis", False), (REDIS_UNIX, "redis-unix", True)):
        if key in skip:
            continue
        redis = ls.start_redis(logs, unix_socket=unix_socket)
        r1 = ls.start_gateway(
            logs, args=["--pickup-timeout", "600", "--queue-url", redis.url], env=env
        )
        w1 = null_worker(r1.url, logs, f"null-worker-{key}-{next(_N)}", tree, env)
        s = Stack().add("redis-server", _pid(redis)).add("gateway", _pid(r1))
        paths[name] = Path_(name, [r1.url], s.add("worker", _pid(w1)))
    if "replicas" not in skip:
        redis = ls.start_redis(logs)
        s = Stack().add("redis-server", _pid(redis))
        urls = []
        for _ in range(2):  # a worker pulling through each replica
            g = ls.start_gateway(
                logs, args=["--pickup-timeout", "600", "--queue-url", redis.url], env=env
            )
            s.add("gateway", _pid(g)).add(
                "worker", _pid(null_worker(g.url, logs, f"null-r{next(_N)}", tree, env))
            )
            urls.append(g.url)
        paths[REPLICAS] = Path_(REPLICAS, urls, s)
    if "cluster" not in skip:
        nodes = ls.start_redis_cluster(logs / f"cluster-{next(_N)}")
        args = ["--pickup-timeout", "600", "--queue-url", ls.cluster_url(nodes)]
        g = ls.start_gateway(logs, args=args, env=env)
        s = Stack().add("gateway", _pid(g))
        for node in nodes:
            s.add("redis-server", _pid(node))
        w = null_worker(g.url, logs, f"null-worker-cluster-{next(_N)}", tree, env)
        paths[CLUSTER] = Path_(CLUSTER, [g.url], s.add("worker", _pid(w)))
    return paths


def ab_report(paths: dict[str, Path_], rev: str) -> dict[str, Any]:
    """Per stack and pattern, this tree / ``rev``: the median over rounds of each round's
    ratio of inputs/s and of inputs/s per core by role (> 1: this tree is faster or cheaper).
    Printed as a table; returned for the results file."""
    out: dict[str, Any] = {}
    print(f"\n## A/B, this tree / {rev} ({LABEL}): median of the rounds' ratios (min-max)\n")
    print("| stack | pattern | inputs/s | per core: gateway | worker | redis-server |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, new in paths.items():
        if not name.endswith(" [this tree]"):
            continue
        stack = name.removesuffix(" [this tree]")
        old = paths[f"{stack} [{rev}]"]
        for pattern in PATTERNS:
            pairs = list(zip(old.rounds[pattern], new.rounds[pattern], strict=True))
            ratios: dict[str, list[float]] = {
                "inputs/s": [
                    (n["inputs"] / n["seconds"]) / (o["inputs"] / o["seconds"]) for o, n in pairs
                ]
            }
            for role in ("gateway", "worker", "redis-server"):
                if all(o["cpu_s"].get(role) and n["cpu_s"].get(role) for o, n in pairs):
                    ratios[role] = [o["cpu_s"][role] / n["cpu_s"][role] for o, n in pairs]
            row = {k: (statistics.median(v), min(v), max(v)) for k, v in ratios.items()}
            out.setdefault(stack, {})[pattern] = row
            cells = [
                f"{row[k][0]:.3f} ({row[k][1]:.2f}-{row[k][2]:.2f})" if k in row else "—"
                for k in ("inputs/s", "gateway", "worker", "redis-server")
            ]
            print(f"| {stack} | {pattern} | " + " | ".join(cells) + " |")
    return out


def report(results: dict[str, Any], tops: dict[str, Any], floor: dict[str, float]) -> None:
    print(f"\n## The serving path alone — {LABEL}; median of the rounds (min-max)\n")
    print("| stack | pattern | inputs/s | CPU-s per 1,000 inputs: gateway / worker / redis "
          "/ client | inputs/s per core: gateway / worker |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name, by_pattern in results.items():
        for pattern, r in by_pattern.items():
            cpu = " / ".join(f"{r['cpu_s_per_1k'].get(role, 0):.3f}" for role in ROLES)
            core = " / ".join(
                f"{r['per_core'].get(role, 0):,.0f}" for role in ("gateway", "worker")
            )
            rate = f"{r['inputs_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})"
            print(f"| {name} | {pattern} | {rate} | {cpu} | {core} |")
    print("\n## The worker's tokenization alone (one thread, this process): its floor\n")
    print("| pattern | texts per call | CPU-s per 1,000 inputs | inputs/s per core | "
          "share of the worker's CPU per input, by stack |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for pattern, cpu in floor.items():
        shares = ", ".join(
            f"{name} {cpu / r[pattern]['cpu_s_per_1k']['worker']:.0%}"
            for name, r in results.items()
            if r[pattern]["cpu_s_per_1k"].get("worker")
        )
        print(f"| {pattern} | {PATTERNS[pattern][0]} | {cpu:.3f} | {1000 / cpu:,.0f} | {shares} |")
    for where, frames in tops.items():
        print(f"\n### py-spy, {where}: top frames by own time ({LABEL})")
        for frame, share in frames:
            print(f"  {share:6.1%}  {frame}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

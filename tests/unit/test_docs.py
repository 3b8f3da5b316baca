"""The docs held to the code: the configuration reference against the config models, the
metric tables against what the processes export, the promises table against the tests."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tests.support import InProcessGateway
from worker import metrics as worker_metrics
from worker.config import Config, GeneratorConfig, MonitoringConfig, QueueConfig
from worker.model_entry import (
    ClassificationTask,
    EmbeddingTask,
    ModelEntry,
    ScoringTask,
    SparseEmbeddingTask,
    TokenEmbeddingTask,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG_DOC = REPO / "docs" / "configuration.md"
#: Section heading of docs/configuration.md -> the model whose fields its table documents.
SECTIONS: dict[str, type[BaseModel]] = {
    "## Top level": Config,
    "## `[generator]`": GeneratorConfig,
    "## `[queue]`": QueueConfig,
    '### `[queue.models."<name>"]`': ModelEntry,
    "## `[monitoring]`": MonitoringConfig,
}
#: Tables of tables: documented as ``embedding_task.supported`` etc.
NESTED: dict[str, type[BaseModel]] = {
    "embedding_task": EmbeddingTask,
    "scoring_task": ScoringTask,
    "classification_task": ClassificationTask,
    "sparse_embedding_task": SparseEmbeddingTask,
    "token_embedding_task": TokenEmbeddingTask,
}
#: Defaults the table describes in words instead of a value.
IN_WORDS = (
    "required",
    "vLLM's",
    "from the model",
    "see meaning",
    "—",
    "×",
    "Qwen3-Reranker",
    "`model_path`",
)


def config_tables() -> dict[str, list[list[str]]]:
    """Section heading -> rows (cells) of its first table."""
    tables: dict[str, list[list[str]]] = {}
    section = None
    for line in CONFIG_DOC.read_text().splitlines():
        if line.startswith("#"):
            section = next((h for h in SECTIONS if line.startswith(h)), None)
            continue
        if section and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            tables.setdefault(section, []).append(cells)
    return tables


def documented_keys(cell: str) -> list[str]:
    return re.findall(r"`([a-z_.]+)`", cell.split(" / ", maxsplit=1)[0]) + [
        f"scoring_task.{k}" for k in re.findall(r"`([a-z_]+)`", " / ".join(cell.split(" / ")[1:]))
    ]


def model_keys(model: type[BaseModel]) -> dict[str, Any]:
    """Documented key -> the field's default (PydanticUndefined when required)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if (model is Config and name in ("generator", "queue", "monitoring")) or (
            model is QueueConfig and name == "models"
        ):
            continue  # tables of their own
        sub = NESTED.get(name)
        if sub is not None and model is ModelEntry:
            out.update({f"{name}.{k}": f.default for k, f in sub.model_fields.items()})
        else:
            out[name] = (
                field.default_factory()
                if field.default_factory is not None  # type: ignore[call-arg]
                else field.default
            )
    return out


def test_every_config_key_is_documented_and_every_documented_key_exists():
    tables = config_tables()
    assert set(tables) == set(SECTIONS)
    for section, model in SECTIONS.items():
        documented = {k for row in tables[section] for k in documented_keys(row[0])}
        assert documented == set(model_keys(model)), section


def parse_default(text: str) -> Any:
    text = text.strip().strip("`").strip('"')
    if text in ("true", "false"):
        return text == "true"
    if text == "[]":
        return []
    if text == "{}":
        return {}
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


@pytest.mark.parametrize("section", list(SECTIONS))
def test_documented_defaults_are_the_defaults(section):
    defaults = model_keys(SECTIONS[section])
    for row in config_tables()[section]:
        keys, cell = documented_keys(row[0]), row[2]
        if cell == "required":
            assert all(defaults[k] is PydanticUndefined for k in keys), row
            continue
        if any(w in cell for w in IN_WORDS):
            continue
        if cell.strip("`").startswith("[") and len(keys) == 1:  # one list value, e.g. [-1.0, 1.0]
            values = [json.loads(cell.strip("`"))]
        else:
            values = [parse_default(v) for v in re.split(r",| / ", cell)]
        assert [defaults[k] for k in keys] == values, row


def test_worker_metrics_in_the_readme_are_exported():
    readme = (REPO / "README.md").read_text()
    table = readme[
        readme.index("| `inference_worker_items_pulled_total`") : readme.index("| `vllm_*`")
    ]
    names = set()
    for first in re.findall(r"^\| (`[^|]+)\|", table, re.M):
        stems = re.findall(r"`([a-z_]+)`", first)
        base = stems[0]
        names.add(base)
        names.update(base.rsplit("_", 2)[0] + s if s.startswith("_") else s for s in stems[1:])
    exported = {m._name for m in vars(worker_metrics).values() if hasattr(m, "_name")}  # type: ignore[attr-defined]
    exported |= {n + suffix for n in exported for suffix in ("_total", "_info")}
    missing = sorted(n.removesuffix("_total") for n in names if n not in exported)
    assert names and not missing, missing


async def test_gateway_metrics_in_the_readme_are_exported():
    readme = (REPO / "README.md").read_text()
    part = readme[readme.index("The gateway's `/metrics`") : readme.index("**Probes**")]
    names = set(re.findall(r"`(inference_gateway_[a-z_]+)\{", part))
    assert len(names) >= 10
    async with InProcessGateway() as gw:
        text = await gw.metrics()
    families = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    assert names <= families | {
        n.removesuffix("_total") for n in names if n.removesuffix("_total") in families
    }


PROMISES = REPO / "docs" / "promises.md"


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")
    }


def test_every_promise_names_tests_that_exist():
    rows = [
        line
        for line in PROMISES.read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| promise", "| ---"))
    ]
    assert len(rows) >= 100
    known: dict[str, set[str]] = {}
    for row in rows:
        refs = re.findall(r"`(tests/(?:unit|e2e)/[a-z_]+\.py)::(test_[a-z0-9_]+)`", row)
        assert refs, f"a promise without a test: {row}"
        for file, name in refs:
            if file not in known:
                known[file] = _tests_in(REPO / file)
            assert name in known[file], f"{file}::{name} does not exist ({row[:80]})"


def test_ci_runs_lint_typecheck_and_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    block = readme[readme.index("```sh") + 1 : readme.index("```sh") + 3]
    assert [line.split()[:2] for line in block] == [["make", "demo"], ["make", "test"]]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci[-3:] == ["make lint", "make typecheck", "make test"]
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test", "lint", "typecheck"):
        assert re.search(rf"^{target}: setup$", makefile, re.M), target
    # the fast layer installs the test extra alone: no vLLM
    assert re.search(r"^test-fast:\n\tscripts/setup.sh test\n", makefile, re.M)
    assert "SHARED" not in (REPO / ".ci" / "run").read_text()


def test_make_test_runs_both_layers_in_a_random_order():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ntest: setup\n", 1)[1].split("\n\n", 1)[0]
    runs = [line for line in recipe.splitlines() if "pytest" in line]
    assert len(runs) == 3 and all("-p randomly" in line for line in runs), runs
    # the fast layer with the test extra alone, then what of it needs more, then end to end
    assert "VENV=.venv-fast scripts/setup.sh test" in recipe
    assert ".venv-fast/bin/python" in runs[0] and '-m "not slow" tests/unit' in runs[0]
    assert '-m "extras and not slow" tests/unit' in runs[1] and "-m slow tests/e2e" in runs[2]


def test_the_security_pages_limits_are_the_settings_and_their_defaults():
    """docs/security.md's table of limits: every flag exists, with the default it says; and
    every setting that bounds what a client or worker can cost is in the table."""
    from gateway.settings import GatewaySettings

    text = (REPO / "docs" / "security.md").read_text()
    rows = re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \|", text, re.MULTILINE)
    by_flag = {
        f.json_schema_extra["flag"]: f  # type: ignore[index]
        for f in GatewaySettings.model_fields.values()
    }
    assert len(rows) >= 20
    for flag, default in rows:
        assert flag in by_flag, f"docs/security.md names {flag}, which does not exist"
        want = by_flag[flag].default
        same = str(want) if want is None else float(want)
        assert (default.strip() if want is None else float(default)) == same, (flag, default)
    bounding = {
        "--max-body-bytes", "--body-timeout", "--header-timeout", "--write-timeout",
        "--max-connections", "--internal-port", "--max-chars-per-token", "--max-rerank-bytes",
        "--max-queued-inputs", "--max-queued-batch-inputs", "--advert-ttl", "--max-file-bytes",
        "--max-files-per-key", "--max-file-bytes-per-key", "--file-expiry", "--max-batch-lines",
        "--max-batch-line-bytes", "--max-batches-per-key", "--max-batch-records-per-key",
        "--batch-retention", "--batch-inputs-in-flight",
    }  # fmt: skip
    assert bounding <= {flag for flag, _ in rows}


def readme_module_map() -> dict[str, str]:
    """The README's module map as {path: what it says}: the fenced block that starts with
    ``common/``, two spaces of indent per folder level."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```\n(common/.*?)```", text, re.S)
    assert block, "README has no module map (a fenced block starting with common/)"
    folders: list[str] = []
    mapped: dict[str, str] = {}
    for line in block.group(1).splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name, _, what = line.strip().partition(" ")
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name)
        else:
            mapped["".join(folders) + name] = what.strip()
    return mapped


def test_the_readme_module_map_lists_every_module_and_no_other():
    modules = {
        str(p.relative_to(REPO))
        for top in ("common", "gateway", "worker")
        for p in (REPO / top).rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    mapped = readme_module_map()
    assert sorted(modules - set(mapped)) == [], "modules missing from the README's module map"
    assert sorted(set(mapped) - modules) == [], "the README's module map names missing modules"
    assert all(mapped.values()), "every module in the map says what it is"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves():
    """Links between README.md and docs/*.md reach a file that exists and, with a #fragment,
    a heading of that file."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                if fragment not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def _expand(name: str) -> list[str]:
    """``path-s53-{1,2,3}.json`` -> the three names (one brace group at most)."""
    match = re.search(r"\{([^}]*)\}", name)
    if match is None:
        return [name]
    return [name[: match.start()] + part + name[match.end() :] for part in match[1].split(",")]


def test_every_bench_result_the_docs_name_is_committed():
    """Each results file README.md and docs/benchmarks.md cite (``bench/results/x.json``, a
    brace list of them, a glob, or a bare ``path-…``/``suite-…`` name) is in bench/results/,
    and the README's table names the commit its ``suite-fast.json`` was measured on."""
    results = REPO / "bench" / "results"
    pages = {
        page: page.read_text() for page in (REPO / "README.md", REPO / "docs" / "benchmarks.md")
    }
    missing = []
    for page, text in pages.items():
        cited = re.findall(r"bench/results/([\w.*{},-]+\.(?:json|png))", text)
        cited += re.findall(r"`((?:path|suite)-[\w.*{},-]+\.(?:json|png))`", text)
        assert cited, page
        for name in cited:
            for one in _expand(name):
                if not any(results.glob(one)):
                    missing.append(f"{page.name}: {one}")
    assert missing == []
    commit = re.search(
        r"rounds each, on (\w+); the last invocation in\s+\[bench/results/suite",
        pages[REPO / "README.md"],
    )
    assert commit is not None
    recorded = json.loads((results / "suite-fast.json").read_text())["run"]["commit"]
    assert recorded.removesuffix("-dirty") == commit[1]

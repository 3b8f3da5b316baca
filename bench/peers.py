"""Infinity (michaelfeil/infinity, ``infinity-emb`` on PyPI) as a peer of the benchmarks, in a
virtual environment of its own, with its torch engine and its ONNX Runtime engine.

    python bench/peers.py            # install (idempotent) and print the versions

What it does, as a user of Infinity would:

- ``bench/.venv-infinity``: ``infinity-emb[server,torch]`` (pinned below) with the machine's
  CPU torch wheel, and ``optimum-onnx[onnxruntime]`` for the ONNX engine and its exporter.
  Infinity 0.0.78 was written against optimum 1.x, whose ONNX exporter no longer imports
  beside torch 2.13 (``cannot import name '_attention_scale'``); optimum-onnx 0.1 exports and
  runs fine. ``datasets`` (pulled by optimum) is removed: its pyarrow needs NumPy 2, Infinity
  pins NumPy < 2, and nothing here uses it.
- the ONNX model: ``optimum-cli export onnx --task feature-extraction --library-name
  transformers`` of the same checkpoint, with the sentence-transformers pooling files copied
  beside it (Infinity reads the pooling mode from them);
- Infinity optimises an ONNX model at its first start (ONNX Runtime graph optimisation level
  99 with the transformer fusions) and keeps the result in its cache; with optimum-onnx its
  call fails (an argument renamed), so this module runs the same optimisation, with the new
  argument name, into the cache folder Infinity reads (``<HF_HOME>/hub/infinity_onnx/
  CPUExecutionProvider/<model id>``) — Infinity then starts from it, as on its second start.
- Infinity is started with ``--model-id .`` from the ONNX folder: given an absolute path it
  names the ONNX file by its absolute path, which optimum-onnx's loader does not find.
- Every path embeds the same tokens: Infinity's torch engine (sentence-transformers inside)
  truncates at the checkpoint's ``sentence_bert_config.json`` ``max_seq_length`` (256 for
  all-MiniLM-L6-v2, and for the fast engine's copy of its files), while the other paths take
  ``max_seq_length`` tokens (512); it is given a view of the checkpoint (links to its files) whose
  ``max_seq_length`` says so, as a user who wants longer inputs would set it. Its ONNX engine
  truncates at ``max_position_embeddings`` (512).

No weights are downloaded (``HF_HUB_OFFLINE=1``); telemetry is off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devstack import localstack as ls  # noqa: E402

VENV = REPO / "bench" / ".venv-infinity"
INFINITY = "infinity-emb[server,torch]==0.0.78"
REQUIREMENTS = [INFINITY, "optimum-onnx[onnxruntime]==0.1.0", "torch==2.13.0"]
#: The sentence-transformers files that say how to pool (Infinity reads them).
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_ENV = {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}


def _py() -> Path:
    return VENV / "bin" / "python"


def install() -> None:
    """Create the venv and install Infinity into it (does nothing when it is there)."""
    marker = VENV / "installed.txt"
    if marker.exists() and marker.read_text() == "\n".join(REQUIREMENTS):
        return
    if not _py().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(_py()), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    subprocess.run(
        [str(_py()), "-m", "pip", "uninstall", "--quiet", "-y", "datasets", "pyarrow"],
        check=False,
    )
    marker.write_text("\n".join(REQUIREMENTS))


def onnx_model(model: Path, out: Path) -> Path:
    """``model`` exported to ONNX in ``out`` (once), with its pooling files."""
    if not (out / "model.onnx").exists():
        subprocess.run(
            [
                str(VENV / "bin" / "optimum-cli"),
                "export",
                "onnx",
                "--model",
                str(model),
                "--task",
                "feature-extraction",
                "--library-name",
                "transformers",
                str(out),
            ],
            check=True,
            env={**os.environ, **_ENV},
            stdout=subprocess.DEVNULL,
        )
    for name in ST_FILES:
        if (model / name).exists():
            shutil.copy(model / name, out / name)
    if (model / "1_Pooling").is_dir():
        shutil.copytree(model / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
    return out


def pooling_method(model: Path) -> str:
    """Infinity's ``--pooling-method`` for the model's sentence-transformers pooling
    (``1_Pooling/config.json``): its ``auto`` reads that file for the torch engine only and
    takes CLS for an ONNX folder (MiniLM's vectors then differ from sentence-transformers',
    cosine down to 0.63)."""
    config = model / "1_Pooling" / "config.json"
    if config.exists() and json.loads(config.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


_OPTIMIZE = """
import sys
from pathlib import Path
from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer
from optimum.onnxruntime.configuration import OptimizationConfig
out = Path(HUGGINGFACE_HUB_CACHE) / "infinity_onnx" / "CPUExecutionProvider" / "."
if not list(out.glob("*_optimized.onnx")):
    model = ORTModelForFeatureExtraction.from_pretrained(
        ".", file_name="model.onnx", provider="CPUExecutionProvider")
    # Infinity's own settings (infinity_emb/transformer/utils_optimum.py, optimize_model):
    # level 99, transformer-specific fusions on (optimize_with_onnxruntime_only=False), CPU.
    ORTOptimizer.from_pretrained(model).optimize(
        optimization_config=OptimizationConfig(
            optimization_level=99, enable_transformers_specific_optimizations=True,
            optimize_for_gpu=False, fp16=False),
        save_dir=str(out), one_external_file=True)
"""


def with_max_seq_length(model: Path, max_seq_length: int, out: Path) -> Path:
    """``model`` as sentence-transformers would load it with ``max_seq_length`` tokens: ``out``
    holds links to every file of ``model`` but ``sentence_bert_config.json``, written with that
    ``max_seq_length``. Returns ``model`` itself where it already says so."""
    config = model / "sentence_bert_config.json"
    st_config = json.loads(config.read_text()) if config.exists() else {}
    if st_config.get("max_seq_length") == max_seq_length:
        return model
    out.mkdir(parents=True, exist_ok=True)
    for entry in model.iterdir():
        link = out / entry.name
        if entry.name != config.name and not link.exists():
            link.symlink_to(entry.resolve())
    (out / config.name).write_text(json.dumps({**st_config, "max_seq_length": max_seq_length}))
    return out


def optimise_onnx(onnx: Path, hf_home: Path) -> None:
    """Infinity's optimisation of the ONNX export in ``onnx`` (see the module docstring), into
    the cache under ``hf_home`` where Infinity (``HF_HOME=hf_home``) reads it; once."""
    env = {**os.environ, **_ENV, "HF_HOME": str(hf_home)}
    subprocess.run([str(_py()), "-c", _OPTIMIZE], cwd=onnx, env=env, check=True)


def start_infinity(
    model: Path,
    name: str,
    engine: str,
    workdir: Path,
    log_dir: Path,
    dtype: str = "float32",
    max_seq_length: int = 512,
) -> ls.Proc:
    """Infinity's server on loopback serving ``model`` as ``name`` at ``/v1/embeddings``, with
    its ``torch`` or ``optimum`` (ONNX Runtime) engine on the CPU, inputs truncated at
    ``max_seq_length`` tokens (the torch engine: see :func:`with_max_seq_length`); waited for
    on ``/health`` (outside the ``/v1`` prefix)."""
    install()
    port = ls.free_port()
    hf_home = workdir / f"hf-{engine}"
    env = {**_ENV, "HF_HOME": str(hf_home)}
    cmd = [
        str(VENV / "bin" / "infinity_emb"),
        "v2",
        "--served-model-name",
        name,
        "--engine",
        engine,
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--url-prefix",
        "/v1",
        "--pooling-method",
        pooling_method(model),
    ]
    cwd = None
    if engine == "optimum":
        onnx = onnx_model(model, workdir / f"{model.name}-onnx")
        optimise_onnx(onnx, hf_home)
        cmd += ["--model-id", "."]
        cwd = onnx
    else:
        view = with_max_seq_length(
            model, max_seq_length, workdir / f"{model.name}-{max_seq_length}"
        )
        cmd += ["--model-id", str(view), "--dtype", dtype]
    url = f"http://127.0.0.1:{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)  # ls.start runs the command in the current folder
        return ls.start(
            cmd,
            log_dir / f"infinity-{engine}-{port}.log",
            url=url,
            ready=url + "/health",
            timeout=300,
            env=env,
        )
    finally:
        os.chdir(here)


def versions() -> str:
    out = subprocess.run(
        [str(_py()), "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    keep = ("infinity", "onnxruntime", "optimum", "torch", "transformers", "sentence-transformers")
    return ", ".join(line for line in out.splitlines() if line.lower().startswith(keep))


if __name__ == "__main__":
    install()
    print(versions())

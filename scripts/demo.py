"""The main job on one machine: gateway + worker on the bundled all-MiniLM-L6-v2, then a real
request through the ``openai`` SDK that embeds STS-benchmark sentence pairs and prints them.

Run with ``make demo``. Everything is started as an operator would and stopped cleanly.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devstack import localstack as ls  # noqa: E402


def main() -> int:
    pairs = ls.read_stsb("dev", limit=6)
    logs = Path(tempfile.mkdtemp(prefix="inference-demo-"))
    print(f"logs in {logs}")
    gateway = ls.start_gateway(logs)
    print(f"gateway on {gateway.url}")
    config = (REPO / "configs" / "all-minilm-l6-v2-cpu.toml").read_text()
    config = config.replace('url = "http://127.0.0.1:8000"', f'url = "{gateway.url}"')
    config = config.replace("metrics_port = 4000", f"metrics_port = {ls.free_port()}")
    print("starting worker (vLLM engine start takes ~30 s on CPU) ...")
    worker = ls.start_worker(config, logs, "worker")
    try:
        from openai import OpenAI

        client = OpenAI(base_url=gateway.url + "/v1", api_key=ls.API_KEY)
        texts = [s for a, b, _ in pairs for s in (a, b)]
        resp = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
        vecs = np.array([d.embedding for d in resp.data])
        print(f"\nmodel={resp.model} vectors={vecs.shape} usage={resp.usage.model_dump()}\n")
        for i, text in enumerate(texts):
            head = ", ".join(f"{x:+.4f}" for x in vecs[i, :4])
            print(f"[{head}, ...] {text}")
        print("\ncosine similarity vs STS gold score (0-5):")
        for k, (a, b, gold) in enumerate(pairs):
            cos = float(vecs[2 * k] @ vecs[2 * k + 1])
            print(f"  {cos:.3f}  gold {gold:.2f}  | {a} / {b}")
    finally:
        code = worker.stop()
        gateway.stop()
    print(f"\nworker drained and exited with {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""``inference-batch``: submit a batch job to a gateway and follow it, with the ``openai`` SDK.

    inference-batch submit FILE --model M [--endpoint /v1/embeddings] [--wait] [--output OUT]
    inference-batch status BATCH_ID
    inference-batch cancel BATCH_ID

FILE is a batch input file (JSONL lines ``{"custom_id", "method", "url", "body"}``; ``--model``
fills a body without one), or plain text: one input per line, ``custom_id`` = ``line-<n>``
(1-based). ``--wait`` shows a progress bar until the batch ends, then writes the output lines
to ``--output`` (default ``FILE.out.jsonl``) and the error lines, if any, beside it. The gateway
and key come from ``--base-url`` / ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TERMINAL = ("completed", "failed", "expired", "cancelled")


def batch_lines(path: Path, model: str | None, endpoint: str) -> bytes:
    """The batch input file for ``path`` (see the module). Raises SystemExit naming the line
    of a JSON line without a model when ``--model`` is not given."""
    out = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            line = None
        if not (isinstance(line, dict) and "custom_id" in line):
            body: dict[str, Any] = {"input": raw}
            line = {"custom_id": f"line-{n}", "method": "POST", "url": endpoint, "body": body}
        body = line.setdefault("body", {})
        if isinstance(body, dict) and "model" not in body:
            if model is None:
                raise SystemExit(f"{path}:{n}: the line names no model; give --model")
            body["model"] = model
        out.append(json.dumps(line))
    return ("\n".join(out) + "\n").encode()


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=args.base_url, max_retries=5)


def _follow(client: Any, batch: Any) -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped]

    with tqdm(total=None, unit="line", desc=batch.id) as bar:
        while batch.status not in TERMINAL:
            counts = batch.request_counts
            if counts is not None and counts.total:
                bar.total = counts.total
                bar.n = counts.completed + counts.failed
            bar.set_postfix_str(batch.status)
            bar.refresh()
            time.sleep(1.0)
            batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        if counts is not None:
            bar.total, bar.n = counts.total, counts.completed + counts.failed
        bar.set_postfix_str(batch.status)
    return batch


def submit(args: argparse.Namespace) -> int:
    client = _client(args)
    data = batch_lines(Path(args.file), args.model, args.endpoint)
    uploaded = client.files.create(file=(Path(args.file).name, io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=args.endpoint, completion_window="24h"
    )
    print(batch.id)
    if not args.wait:
        return 0
    batch = _follow(client, batch)
    counts = batch.request_counts
    print(f"{batch.id}: {batch.status}; completed {counts.completed}, failed {counts.failed}")
    if batch.status == "failed" and batch.errors and batch.errors.data:
        for e in batch.errors.data:
            print(f"  line {e.line}: {e.code}: {e.message}", file=sys.stderr)
        return 1
    output = Path(args.output or f"{args.file}.out.jsonl")
    if batch.output_file_id:
        output.write_bytes(client.files.content(batch.output_file_id).content)
        print(f"output: {output}")
    if batch.error_file_id:
        errors = output.with_name(output.name.replace(".jsonl", "") + ".errors.jsonl")
        errors.write_bytes(client.files.content(batch.error_file_id).content)
        print(f"errors: {errors}")
    return 0 if batch.status == "completed" else 1


def status(args: argparse.Namespace) -> int:
    batch = _client(args).batches.retrieve(args.batch_id)
    print(batch.model_dump_json(indent=2))
    return 0


def cancel(args: argparse.Namespace) -> int:
    print(_client(args).batches.cancel(args.batch_id).status)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="inference-batch", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        help="the gateway's /v1 URL (default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="upload FILE and start a batch")
    s.add_argument("file")
    s.add_argument("--model", help="the model, for lines (or plain text) that name none")
    s.add_argument("--endpoint", default="/v1/embeddings", choices=["/v1/embeddings", "/v1/rerank"])
    s.add_argument("--wait", action="store_true", help="follow it to the end; write the output")
    s.add_argument("--output", help="where --wait writes the output lines")
    s.set_defaults(run=submit)
    for name, fn in (("status", status), ("cancel", cancel)):
        p = sub.add_parser(name, help=f"{name} a batch")
        p.add_argument("batch_id")
        p.set_defaults(run=fn)
    args = ap.parse_args(argv)
    if not os.environ.get("OPENAI_API_KEY"):
        ap.error("set OPENAI_API_KEY to the gateway's client API key")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

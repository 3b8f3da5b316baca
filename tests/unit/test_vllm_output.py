"""Relaying vLLM's printed output: levels, tracebacks kept at DEBUG, the root cause found."""

from __future__ import annotations

import logging
from pathlib import Path

from worker.vllm_output import OutputRelay, classify

REPO = Path(__file__).resolve().parents[2]

# What a failed engine start prints (cut from a real run of vLLM 0.32 on CPU).
# ruff: noqa: E501 - log lines as printed
FAILED_START = """\
(EngineCore pid=2922) INFO 11-23 06:38:34 [core.py:133] Initializing a V1 LLM engine (v0.32.0)
(VllmWorker-0 pid=2935) ERROR 11-23 06:38:47 [multiproc_executor.py:953] WorkerProc failed to start.
(VllmWorker-0 pid=2935) ERROR 11-23 06:38:47 [multiproc_executor.py:953] Traceback (most recent call last):
(VllmWorker-0 pid=2935) ERROR 11-23 06:38:47 [multiproc_executor.py:953]   File "cpu_worker.py", line 83, in __init__
(VllmWorker-0 pid=2935) ERROR 11-23 06:38:47 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=2935) ERROR 11-23 06:38:47 [multiproc_executor.py:953] ValueError: Available memory on node 0 (6.84/8.34 GiB) on startup is less than desired
(EngineCore pid=2922) WARNING 11-23 06:38:47 [ompmultiprocessing.py:63] a warning
Process EngineCore:
Traceback (most recent call last):
  File "/x/multiprocessing/process.py", line 314, in _bootstrap
Exception: WorkerProc initialization failed due to an exception in a background process.
"""


def test_classify_levels():
    lines = FAILED_START.splitlines()
    levels = [classify(line)[0] for line in lines]
    assert levels == [logging.INFO] + [logging.DEBUG] * 5 + [logging.WARNING] + [logging.DEBUG] * 4
    assert classify(lines[0])[1] == (
        "(EngineCore pid=2922) [core.py:133] Initializing a V1 LLM engine (v0.32.0)"
    )
    exceptions = [classify(line)[2] for line in lines if classify(line)[2]]
    assert exceptions[0].startswith("ValueError: Available memory on node 0")
    assert exceptions[1].startswith("Exception: WorkerProc initialization failed")
    assert classify("Errors are fine in prose: yes")[0] == logging.INFO


def test_root_cause_is_none_without_an_exception():
    relay = OutputRelay()
    try:
        assert relay.root_cause(wait_seconds=0.1) is None
    finally:
        relay.close()

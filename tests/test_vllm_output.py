"""Relaying vLLM's printed output: levels, tracebacks kept at DEBUG, the root cause found."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.vllm_output import OutputRelay, classify

REPO = Path(__file__).resolve().parents[1]

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


@pytest.mark.slow  # two subprocesses
def test_relay_in_a_child_process():
    """A process with the relay installed: what it and its own child print is relayed through
    logging, the traceback stays at DEBUG, and the root cause is the first exception."""
    code = """
import logging, subprocess, sys, time
from worker.vllm_output import OutputRelay
relay = OutputRelay()
h = logging.StreamHandler(relay.stderr)
h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
logging.getLogger().handlers[:] = [h]
logging.getLogger().setLevel(sys.argv[1])
t0 = time.monotonic()
subprocess.run([sys.executable, "-c", "import os, sys; sys.stdout.write(os.environ['OUT'])"])
print("plain print", flush=True)
cause = relay.root_cause(t0)
relay.close()
relay.stderr.write("CAUSE " + str(cause) + "\\n")
"""
    for level in ("INFO", "DEBUG"):
        r = subprocess.run(
            [sys.executable, "-c", code, level],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO), "OUT": FAILED_START},
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == ""  # fd 1 was relayed too
        err = r.stderr
        assert "INFO worker.vllm: (EngineCore pid=2922) [core.py:133] Initializing" in err
        assert (
            "WARNING worker.vllm: (EngineCore pid=2922) [ompmultiprocessing.py:63] a warning" in err
        )
        assert "INFO worker.vllm: plain print" in err
        assert "CAUSE ValueError: Available memory on node 0" in err
        assert ("Traceback" in err) == (level == "DEBUG")


def test_root_cause_is_none_without_an_exception():
    relay = OutputRelay()
    try:
        assert relay.root_cause(wait_seconds=0.1) is None
    finally:
        relay.close()

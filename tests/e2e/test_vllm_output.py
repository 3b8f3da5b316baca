"""What a process and its own child print goes through the worker's logging (two subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.unit.test_vllm_output import FAILED_START, REPO


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

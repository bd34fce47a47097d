"""Run a test module's worker function in a fresh interpreter with ``TRITON_INTERPRET=1``.

The interpreter flag must be set before the kernels are defined (import time), so kernel tests run
their checks in a subprocess that imports the test module and calls ``worker_call``; the worker
prints one ``RESULTS <json>`` line, which is returned parsed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreter_worker(module: str, worker_call: str, timeout: int = 600) -> dict:
    """``worker_call`` (e.g. ``"_worker(4, True)"``) of tests/``module``.py under the Triton interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", f"import {module} as t; t.{worker_call}"], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULTS "):])

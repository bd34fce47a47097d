"""Shared by benchmarks/gpu_kernels.py and benchmarks/gpu_e2e.py: import hfcompress's format, op
and kernels from this checkout without running ``hfcompress/__init__`` (which wires
transformers/PEFT integrations; a GPU box may carry other versions), timing, and result files.

``--dry-run`` (set before anything imports the kernels) runs the same code on CPU under
``TRITON_INTERPRET=1`` at tiny sizes: it shows the script works end to end, its times mean nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined


def bootstrap() -> None:
    for name, path in (("hfcompress", ROOT / "src" / "hfcompress"), ("hfcompress.kernels", ROOT / "src" / "hfcompress" / "kernels")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod


def bench_ms(fn, reps: int = 100) -> float:
    """Milliseconds per call: CUDA-graph replay on a GPU (launch overhead not counted); on a dry
    run, the wall clock of one interpreted call."""
    import torch

    if DRY:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=reps)


def device_info() -> dict:
    import torch
    import triton

    info = dict(dry_run=DRY, torch=torch.__version__, triton=triton.__version__)
    if not DRY:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=list(torch.cuda.get_device_capability()),
                    sms=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1))
    return info


def git_commit() -> str:
    head = ROOT / ".git"
    try:  # worktrees: .git is a file pointing at the real git dir
        import subprocess

        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - the box may have no git
        return "unknown" if not head.exists() else "unreadable"


def writer(path: Path, result: dict):
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)

    return save

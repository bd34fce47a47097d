"""The GPU benchmark scripts must not crash on the GPU machine for a silly reason: each runs its
``--dry-run`` here (CPU; the kernels under TRITON_INTERPRET=1, a tiny model of the same family)
through the same code path, and its table renders. The target bookkeeping is checked on a
synthetic result (numbers made up for the check, never reported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, tmp_path, *extra):
    out = tmp_path / f"{script}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--table", str(out)], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env=env)
    assert table.returncode == 0, table.stderr[-3000:]
    return json.loads(out.read_text()), table.stdout


def test_gpu_kernels_dry_run(tmp_path):
    r, table = _run("gpu_kernels", tmp_path)
    assert r["dry_run"] and r["correctness"] and r["correctness_all_ok"], r["correctness"]
    assert {c["bits"] for c in r["correctness"]} == {3, 4}
    assert {(x["m"], x["bits"], x["act_order"]) for x in r["speed"] + r["bits3"] + r["act_order"]} >= {
        (1, 4, False), (16, 4, False), (1, 3, False), (1, 4, True)}
    assert all(x["sqnr_db"] >= 35 for x in r["speed"] + r["bits3"] + r["act_order"])
    assert r["targets"] == {}  # interpreter times are not GPU measurements
    assert "| 64 x 256 | 4 | no | 1 |" in table


def test_gpu_kernels_targets_bookkeeping():
    sys.path.insert(0, str(BENCH))
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import gpu_kernels
    finally:
        sys.path.remove(str(BENCH))

    def row(n, k, m, us, bf16, bits=4, act=False, frac=None, tg=None):
        x = dict(n=n, k=k, m=m, bits=bits, act_order=act, ours_us=us, bf16_us=bf16, speedup_vs_bf16=round(bf16 / us, 2))
        if frac is not None:
            x["fraction_of_copy"] = frac
        if tg is not None:
            x["speedup_vs_tinygemm"] = tg
        return x

    r = dict(speed=[row(4096, 4096, 1, 5.0, 12.0, frac=0.5, tg=1.2), row(8192, 8192, 1, 10.0, 30.0, frac=0.8, tg=0.9),
                    row(8192, 8192, 16, 10.0, 25.0), row(8192, 8192, 64, 20.0, 22.0), row(8192, 8192, 256, 40.0, 38.0)],
             bits3=[row(8192, 8192, 1, 9.0, 30.0, bits=3)], act_order=[row(8192, 8192, 1, 12.0, 30.0, act=True)])
    t = gpu_kernels.targets(r)
    assert t["gemv_fraction_of_copy_64M+"]["met"] and t["m1_vs_bf16_8192x8192+"]["met"]
    assert t["m1_vs_bf16_4096x4096"]["met"] and t["m16_vs_bf16"]["met"] and not t["m64_vs_bf16"]["met"]
    assert t["m256+_vs_bf16"]["met"] and not t["m1_m16_vs_tinygemm"]["met"]
    assert t["3bit_gemv_time_over_4bit"]["met"] and not t["act_order_time_over_plain"]["met"]


def test_gpu_e2e_dry_run(tmp_path):
    r, table = _run("gpu_e2e", tmp_path, "--batches", "1,2", "--new-tokens", "6")
    assert r["dry_run"] and r["quantized_layers"] == 2 * 7
    models = [(x["model"], x["batch"]) for x in r["rows"]]
    assert models == [("bf16", 1), ("bf16", 2), ("int4 g128 (RTN)", 1), ("int4 g128 (RTN)", 2)]
    assert all(x["tokens_per_s"] > 0 and x["steps"] == 3 for x in r["rows"])
    assert "target_batch1" not in r  # no target is claimed from a CPU run
    assert "| int4 g128 (RTN) | 1 |" in table

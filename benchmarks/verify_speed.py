"""Digest verification speed (``hfcompress verify DIR``, :func:`hfcompress.integrity.verify`) on a
1 GiB checkpoint: four safetensors shards of bf16/fp16/int32 tensors the size of a 0.5B-parameter
model's layers, written with the save identity and per-tensor SHA-256 digests an hfcompress save
records. Timed warm (files in the page cache, as right after a save or download) with 1 thread
and with one thread per core, ``--repeats`` times each, best kept; the raw SHA-256 speed of one
core on one 256 MiB buffer is measured in the same run as the ceiling.

    python benchmarks/verify_speed.py            # writes benchmarks/results/verify_speed.json
    python benchmarks/verify_speed.py --table benchmarks/results/verify_speed.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hfcompress import integrity

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 2.0


def write_checkpoint(directory: str, total_bytes: int, seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    save_id = integrity.new_save_id()
    shapes = [((4864, 896), torch.bfloat16), ((896, 4864), torch.bfloat16), ((896, 112 * 4), torch.int32),
              ((896, 28), torch.float16), ((151936 // 8, 896), torch.bfloat16)]
    shard_bytes, written, shard, i = total_bytes // 4, 0, {}, 0
    n_shards = 0

    def flush():
        nonlocal shard, n_shards
        if shard:
            n_shards += 1
            save_file(shard, os.path.join(directory, f"model-{n_shards:05d}-of-00004.safetensors"),
                      metadata={"format": "pt", **integrity.identity_metadata(shard, save_id)})
            shard = {}

    while written < total_bytes:
        shape, dtype = shapes[i % len(shapes)]
        t = (torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int32) if dtype == torch.int32
             else torch.randn(shape, generator=g).to(dtype))
        shard[f"model.layers.{i}.weight"] = t
        written += t.numel() * t.element_size()
        if sum(v.numel() * v.element_size() for v in shard.values()) >= shard_bytes:
            flush()
        i += 1
    flush()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"quantization_config": {"quant_method": "hfcompress", "save_id": save_id}}, f)
    return written


def markdown(r: dict) -> str:
    rows = ["| what | threads | wall s (best) | wall runs | GB/s wall | CPU s (best, all threads) | GB per CPU-s |",
            "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        rows.append(f"| {row['what']} | {row['threads']} | {row['seconds']} | {row['runs']} | {row['gb_per_s']} | "
                    f"{row['cpu_seconds']} | {row['gb_per_cpu_s']} |")
    t = r["target"]
    return "\n".join(rows) + (f"\n\nTarget {t['what']} (wall clock): **{'MET' if t['met'] else 'MISSED'}** "
                              f"({t['measured']} s; load average {r.get('load_average')} on {r['cores']} cores "
                              f"during the run; best CPU time of one verify {t['cpu_seconds']} s).")


def main() -> None:
    if "--table" in sys.argv:
        print(markdown(json.loads(Path(sys.argv[sys.argv.index("--table") + 1]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--table", metavar="JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify_speed.json"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="hfcompress-verify-bench-")
    try:
        total = write_checkpoint(work, int(args.gib * 2**30))
        size = sum(os.path.getsize(os.path.join(work, f)) for f in os.listdir(work))
        report = integrity.verify(work)  # warms the page cache
        assert report.ok, report.problems
        buf = os.urandom(256 * 2**20)
        timed = []
        for rep in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            hashlib.sha256(buf).hexdigest()
            timed.append(("raw", 1, time.perf_counter() - t0, time.process_time() - c0, len(buf)))
            for threads in sorted({1, cores}):
                t0, c0 = time.perf_counter(), time.process_time()
                rep_ = integrity.verify(work, threads=threads)
                timed.append(("verify", threads, time.perf_counter() - t0, time.process_time() - c0,
                              rep_.bytes_hashed))
                assert rep_.ok
        rows = []
        for what, label in (("raw", "raw hashlib.sha256, one 256 MiB buffer (ceiling of one core)"),
                            ("verify", f"hfcompress verify: {size / 2**30:.2f} GiB, {report.files} shards, "
                                       f"{report.tensors} tensors")):
            for threads in sorted({t for w, t, *_ in timed if w == what}):
                runs = [s for w, t, s, _, _ in timed if w == what and t == threads]
                cpu = [c for w, t, _, c, _ in timed if w == what and t == threads]
                nbytes = next(b for w, t, _, _, b in timed if w == what and t == threads)
                rows.append(dict(what=label, threads=threads, seconds=round(min(runs), 3),
                                 runs=[round(s, 3) for s in runs], gb_per_s=round(nbytes / min(runs) / 1e9, 2),
                                 cpu_seconds=round(min(cpu), 3), gb_per_cpu_s=round(nbytes / min(cpu) / 1e9, 2)))
        verify_rows = [r for r in rows if r["what"].startswith("hfcompress verify")]
        best = min(r["seconds"] for r in verify_rows)
        result = dict(bytes=size, tensor_bytes=total, cores=cores, cpu=platform.processor() or platform.machine(),
                      hash="sha256 (hashlib/OpenSSL)", torch=torch.__version__, load_average=round(os.getloadavg()[0], 1),
                      rows=rows, target=dict(what=f"verify a 1 GiB checkpoint in <= {TARGET_S} s", measured=best,
                                             cpu_seconds=min(r["cpu_seconds"] for r in verify_rows),
                                             met=best <= TARGET_S))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()

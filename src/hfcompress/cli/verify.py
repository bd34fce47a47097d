"""``hfcompress verify DIR``: re-hash every tensor of a saved checkpoint against the SHA-256 digests
its save recorded, and check that every shard belongs to the save config.json names. Exit 0 when
everything matches, 1 when anything does not (each problem printed with its file and tensor)."""

from __future__ import annotations

import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a saved checkpoint's digests and save identity (flipped bytes, mixed saves)")
    p.add_argument("path", help="checkpoint directory written by save_pretrained after `import hfcompress`")
    p.add_argument("--threads", type=int, default=None, help="hashing threads (default: one per core, at most 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    from hfcompress.integrity import verify

    t0 = time.perf_counter()
    report = verify(args.path, threads=args.threads)
    took = time.perf_counter() - t0
    for problem in report.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{status}: {report.path}: {report.files} file(s), {report.tensors} tensors, "
          f"{report.bytes_hashed / 2**20:.1f} MiB hashed in {took:.2f} s (save_id {report.save_id})")
    return 0 if report.ok else 1

"""What ``malloc_trim`` after every pass costs and holds: one process, SmolLM2 streamed GPTQ with
benchmarks/distributed.py's options, one thread, glibc variants; prints one JSON line (wall, user /
sys seconds, minor page faults, peak RSS).

    python benchmarks/malloc_trim.py MODE BLOCKS SIZE      # e.g. notrim 8 128x512

MODE: ``trim`` (as shipped: ``malloc_trim(0)`` after every pass over the calibration inputs),
``notrim`` (never), ``mmap32`` (``mallopt(M_MMAP_THRESHOLD, 32 MiB)``, trims as shipped),
``mmap32-notrim``. Results of the run quoted in README.md: results/malloc_trim_8blocks_128x512.json.
"""

import ctypes
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

M_MMAP_THRESHOLD = -3


def main() -> None:
    mode, blocks, size = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import torch

    torch.set_num_threads(1)
    import hfcompress.calibration.blocks as calibration_blocks

    if "notrim" in mode:
        calibration_blocks.return_freed_memory = lambda: None
    if "mmap32" in mode:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 32 << 20)
    import distributed as bench
    from transformers import AutoTokenizer

    import hfcompress
    from hfcompress.calibration import get_calibration_batches

    n, s = (int(v) for v in size.split("x"))
    src = bench._source(blocks)
    batches = get_calibration_batches(AutoTokenizer.from_pretrained(src), None, n_samples=n, seq_len=s, batch_size=8)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cfg = hfcompress.GPTQConfig(**bench.gptq_options(), n_samples=n, seq_len=s)
    with tempfile.TemporaryDirectory(prefix="malloc-trim-") as out:
        hfcompress.quantize(src, cfg, out_dir=os.path.join(out, "q"), batches=batches, dtype=torch.bfloat16)
        wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"mode": mode, "wall": round(wall, 2), "user": round(r1.ru_utime - r0.ru_utime, 2),
                      "sys": round(r1.ru_stime - r0.ru_stime, 2), "minflt": r1.ru_minflt - r0.ru_minflt,
                      "rss_mb": round(r1.ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()

"""Cost of the order-independent X^T X sum (issue #17, "same result"): per calibration batch, the
engine before (an fp32 running sum, ``addmm_`` into the blocks on and above the diagonal) vs now
(``InputStats.add_``: each batch's fp32 product on its own, added to a float64 sum), on SmolLM2's
layer widths (K = 576: q/k/v, o, gate/up inputs; K = 1536: down_proj) and batches of 8 windows.

Also checks what the change is for: the sum over 16 batches is the same bit for bit when the batches
are summed by one process or as two halves merged (2 ranks), and says whether the fp32 running sum is.

    python benchmarks/xtx_sum.py        # ~1 minute; writes benchmarks/results/xtx_sum.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

import torch

from hfcompress.calibration import InputStats

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "xtx_sum.json")
B = InputStats.BLOCK


def fp32_running_add_(s: torch.Tensor, x: torch.Tensor) -> None:
    """The engine before: this batch's product accumulated into the fp32 sum (upper blocks)."""
    k = x.shape[1]
    xt = x.t()
    for i in range(0, k, B):
        s[i:i + B, i:].addmm_(xt[i:i + B], x[:, i:])


def timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for tokens in (2048, 4096):  # 8 windows of 256 / 512 tokens
            for k in (576, 1536):
                x = (torch.randn(tokens, k, generator=g) * torch.rand(k, generator=g) * 4).bfloat16().float()
                old = torch.zeros(k, k)
                new = InputStats.zeros(k)
                t_old = timed(lambda: fp32_running_add_(old, x))
                t_new = timed(lambda: new.add_(x))
                rows.append({"threads": threads, "tokens_per_batch": tokens, "K": k, "fp32_running_ms": round(1e3 * t_old, 2),
                             "fp64_sum_ms": round(1e3 * t_new, 2), "ratio": round(t_new / t_old, 3)})
                print(rows[-1], flush=True)
    # order independence on 16 batches of down_proj width
    torch.set_num_threads(1)
    batches = [(torch.randn(512, 1536, generator=g) * torch.rand(1536, generator=g) * 4).bfloat16().float()
               for _ in range(16)]

    def new_sum(parts):
        stats = []
        for part in parts:
            s = InputStats.zeros(1536)
            for x in part:
                s.add_(x)
            stats.append(s)
        for s in stats[1:]:
            stats[0].merge_(s)
        return stats[0].xtx

    def old_sum(parts):
        sums = []
        for part in parts:
            s = torch.zeros(1536, 1536)
            for x in part:
                fp32_running_add_(s, x)
            sums.append(s)
        return sum(sums[1:], sums[0]).triu()

    same_new = torch.equal(new_sum([batches]), new_sum([batches[:8], batches[8:]]))
    a, b = old_sum([batches]), old_sum([batches[:8], batches[8:]])
    differing_old = int((a != b).sum())
    # per decoder block and batch: X^T X of three inputs of width 576 (q/k/v, o, gate/up) and one of 1536
    per_block = {}
    for threads in (1, 2):
        for tokens in (2048, 4096):
            r = {row["K"]: row for row in rows if row["threads"] == threads and row["tokens_per_batch"] == tokens}
            old = 3 * r[576]["fp32_running_ms"] + r[1536]["fp32_running_ms"]
            new = 3 * r[576]["fp64_sum_ms"] + r[1536]["fp64_sum_ms"]
            per_block[f"{threads} thread(s), {tokens} tokens"] = {"fp32_running_ms": round(old, 1),
                                                                 "fp64_sum_ms": round(new, 1),
                                                                 "ratio": round(new / old, 3)}
    out = {"what": __doc__.split("\n\n")[0], "command": "python benchmarks/xtx_sum.py",
           "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "rows": rows, "per_block_and_batch": per_block,
           "sum_of_16_batches_same_as_two_halves_merged": {"fp64_sum": same_new,
                                                           "fp32_running_entries_differing": differing_old,
                                                           "of": 1536 * 1537 // 2}}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["per_block_and_batch"], indent=1))
    print(json.dumps(out["sum_of_16_batches_same_as_two_halves_merged"]))


if __name__ == "__main__":
    main()

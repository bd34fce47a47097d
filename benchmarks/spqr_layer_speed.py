"""SpQR CPU path vs fp32 at batch 1 (process CPU time, one thread): SmolLM2-135M's linear shapes
with random SpQR layers (3-bit, groups of 16, 3-bit statistics, act-order permutation, 0.1% outliers).

- ``layers``: one layer called over and over (its weights stay in cache: the fp32 GEMV's best case);
- ``body``: SmolLM2's 30 decoder blocks' 210 linear layers called in model order, fp32 ``nn.Linear``
  against SpQR layers (fp32 and bf16 activations): weights stream from memory as in decoding.

Best of ``--repeats``, interleaved. Writes benchmarks/results/spqr_layer_speed.json.

    python benchmarks/spqr_layer_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from hfcompress.algorithms.spqr import SpQRResult
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec
from hfcompress.ops import set_cpu_fast_path

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def random_spqr(n: int, k: int, outliers: float, g: torch.Generator) -> SpQRLinear:
    """A SpQR layer with random codes and statistics (the speed does not depend on the values)."""
    groups, stat_groups = k // 16, -(-n // 16)
    nnz = int(outliers * n * k)
    flat = torch.randperm(n * k, generator=g)[:nnz].sort().values
    r = SpQRResult(torch.randint(0, 8, (n, k), dtype=torch.uint8, generator=g),
                   torch.randint(0, 8, (n, groups), dtype=torch.uint8, generator=g),
                   torch.randint(0, 8, (n, groups), dtype=torch.uint8, generator=g),
                   (torch.rand(groups, stat_groups, generator=g) * 1e-3 + 1e-4).half(),
                   torch.full((groups, stat_groups), -1.0).half(), torch.randperm(k, generator=g).int(),
                   flat // k, flat % k, (torch.randn(nnz, generator=g) * 0.1).half())
    return SpQRLinear.from_codes(r, SpQRSpec(), compute_dtype=torch.float32)


def best_ms(fn, repeats: int, inner: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(inner):
            fn()
        best = min(best, (time.process_time() - t0) / inner)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--outliers", type=float, default=0.001)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    set_cpu_fast_path("auto")
    load_before = os.getloadavg()
    xs = {k: torch.randn(1, k, generator=g) for k in (576, 1536)}
    res: dict = {"layers": {}, "body": {}}
    with torch.no_grad():
        for n, k in sorted(set(SHAPES)):
            lay = random_spqr(n, k, args.outliers, g)
            lin = torch.nn.Linear(k, n, bias=False)
            lb = random_spqr(n, k, args.outliers, g).to(torch.bfloat16)
            x, xb = xs[k], xs[k].bfloat16()
            for f in (lambda: lin(x), lambda: lay(x), lambda: lb(xb)):
                f()
            fp, s32, s16 = (best_ms(f, args.repeats, 300) for f in (lambda: lin(x), lambda: lay(x), lambda: lb(xb)))
            res["layers"][f"{n}x{k}"] = dict(fp32_us=round(fp * 1e3, 1), spqr_fp32_us=round(s32 * 1e3, 1),
                                             spqr_bf16_us=round(s16 * 1e3, 1), speedup_fp32=round(fp / s32, 2),
                                             speedup_bf16=round(fp / s16, 2), nnz=lay.n_outliers)
            print(f"{n}x{k}", res["layers"][f"{n}x{k}"], flush=True)
        shapes = SHAPES * args.blocks
        dense = [torch.nn.Linear(k, n, bias=False) for n, k in shapes]
        spqr32 = [random_spqr(n, k, args.outliers, g) for n, k in shapes]
        spqr16 = [m.to(torch.bfloat16) for m in (random_spqr(n, k, args.outliers, g) for n, k in shapes)]
        xb = {k: v.bfloat16() for k, v in xs.items()}
        runs = {"fp32": lambda: [m(xs[m.in_features]) for m in dense],
                "spqr_fp32": lambda: [m(xs[m.in_features]) for m in spqr32],
                "spqr_bf16": lambda: [m(xb[m.in_features]) for m in spqr16]}
        for f in runs.values():
            f()  # re-pack once
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, f in runs.items():
                times[k].append(best_ms(f, 1))
        body = {f"{k}_ms": round(min(v), 2) for k, v in times.items()}
        body.update(speedup_fp32=round(body["fp32_ms"] / body["spqr_fp32_ms"], 2),
                    speedup_bf16=round(body["fp32_ms"] / body["spqr_bf16_ms"], 2), layers=len(shapes))
        res["body"] = body
        print("body", body, flush=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spqr_layer_speed.json")
    with open(out, "w") as f:
        json.dump({"what": "SpQR w3 g16 (act-order, outliers) on the CPU fast path vs fp32 nn.Linear, batch 1, one "
                   "thread, process CPU time, random weights in SmolLM2-135M's shapes", "torch": torch.__version__,
                   "outlier_fraction": args.outliers, "load_average_before": [round(v, 2) for v in load_before],
                   "load_average_after": [round(v, 2) for v in os.getloadavg()], **res}, f, indent=1)


if __name__ == "__main__":
    main()

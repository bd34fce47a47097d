"""A proxy for choosing SpQR's configuration (not the perplexity target itself): the output error
``tr(dW H dW^T) / tr(W H W^T)`` of single layers, SpQR configurations against GPTQ 4-bit g128 and
GPTQ 3-bit g64 on the same Hessians, with bits per weight everything counted.

Layers: q_proj, o_proj, up_proj, down_proj of SmolLM2-135M's blocks 0, 9, 19 and 29 (16 layers),
Hessians from 32 x 256 tokens of the bundled Shakespeare calibration text (``--calibration``; the
default set of benchmarks/quality.py when these were measured) through the float model: every
method quantizes on these. The error is measured twice: on the same Hessians (in domain), and on
the Hessians of 32 x 256 tokens of a held-out set the quantizers never see (``--held-out``, by
default the bundled ``mixed`` set: Shakespeare, Node.js docs, Rust release notes; none of the
evaluation domains, so choosing on it does not tune on the test texts): how well a configuration
generalises away from its calibration. Reported: each configuration's geometric mean over the
layers and its weighted bits per weight. Writes benchmarks/results/spqr_layer_error.json.

    python benchmarks/spqr_layer_error.py [--configs NAME ...] [--held-out mixed] [--merge]
    python benchmarks/spqr_layer_error.py --table     # the markdown table of benchmarks/README.md
    python benchmarks/spqr_layer_error.py --calibration mixed --held-out shakespeare --out F.json --configs ...

``--merge`` adds the configurations run to the results already in the file (same calibration and
held-out set; each run recomputes the Hessians and the GPTQ rows, which are deterministic), so a
long list can be measured in several short runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from hfcompress.algorithms.gptq import gptq
from hfcompress.algorithms.spqr import prepare_hessian, spqr
from hfcompress.calibration import get_calibration_batches
from hfcompress.formats.int_group import IntGroupSpec, QuantLinear
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec
from hfcompress.smollm2 import smollm2_checkpoint

BLOCKS = (0, 9, 19, 29)
# name -> (SpQRSpec fields, outlier threshold, damp, other spqr() keywords)
CONFIGS = {
    "spqr-w3-g16-t2.0": (dict(), 2.0, 0.01, {}),
    "spqr-w3-g16-sg32-t0.7": (dict(stat_group_size=32), 0.7, 0.01, {}),
    "spqr-w3-g32-t0.5": (dict(group_size=32), 0.5, 0.01, {}),
    "spqr-w3-g16-sg32-t0.7-damp0.1": (dict(stat_group_size=32), 0.7, 0.1, {}),
    "spqr-w3-g16-sg32-t0.7-damp1.0": (dict(stat_group_size=32), 0.7, 1.0, {}),
    "spqr-w3-g16-sg32-t0.7-uniform": (dict(stat_group_size=32), 0.7, 0.01, dict(grid_weighting="uniform")),
    "spqr-w3-g16-sg32-t0.7-uniform-damp0.1": (dict(stat_group_size=32), 0.7, 0.1, dict(grid_weighting="uniform")),
    "spqr-w3-g16-sg32-noout": (dict(stat_group_size=32), float("inf"), 0.01, {}),
    "spqr-w3-g16-sg32-t0.7-damp0.03": (dict(stat_group_size=32), 0.7, 0.03, {}),
    "spqr-w3-g16-sg32-t0.7-damp0.05": (dict(stat_group_size=32), 0.7, 0.05, {}),
    "spqr-w3-g16-sg32-t0.5-damp0.1": (dict(stat_group_size=32), 0.5, 0.1, {}),
    "spqr-w3-g16-sg64-t0.4-damp0.1": (dict(stat_group_size=64), 0.4, 0.1, {}),
    "spqr-w3-g16-sg32-t0.5-damp0.2": (dict(stat_group_size=32), 0.5, 0.2, {}),
    "spqr-w3-g16-sg64-t0.5-damp0.1": (dict(stat_group_size=64), 0.5, 0.1, {}),
    "spqr-w3-g16-sg64-t0.55-damp0.1": (dict(stat_group_size=64), 0.55, 0.1, {}),
    "spqr-w3-g16-sg32-t0.55-damp0.1": (dict(stat_group_size=32), 0.55, 0.1, {}),
    "spqr-w3-g32-sg32-t0.25-damp0.1": (dict(group_size=32, stat_group_size=32), 0.25, 0.1, {}),
    "spqr-w3-g32-t0.25-damp0.1": (dict(group_size=32), 0.25, 0.1, {}),
    "spqr-w3-g32-t0.35-damp0.1": (dict(group_size=32), 0.35, 0.1, {}),
    "spqr-w3-g16-sg32-t0.7-noclip": (dict(stat_group_size=32), 0.7, 0.01, dict(grid_clip=False)),
    "spqr-w3-g16-sg32-t0.7-noclip-damp0.1": (dict(stat_group_size=32), 0.7, 0.1, dict(grid_clip=False)),
    "spqr-w3-g16-sg32-t0.7-damp0.1-noact": (dict(stat_group_size=32, act_order=False), 0.7, 0.1, {}),
    # the levels of benchmarks/spqr_mixed.py (per-layer bit widths): which column order for the 4-bit layers
    "spqr-w3-g32-sg64-t0.5-damp0.1": (dict(group_size=32, stat_group_size=64), 0.5, 0.1, {}),
    "spqr-w4-g32-sg64-t0.5-damp0.1": (dict(bits=4, group_size=32, stat_group_size=64), 0.5, 0.1, {}),
    "spqr-w4-g32-sg64-t0.5-damp0.1-noact": (dict(bits=4, group_size=32, stat_group_size=64, act_order=False), 0.5,
                                            0.1, {}),
    "spqr-w4-g32-s4-sg64-t0.5-damp0.1": (dict(bits=4, group_size=32, stat_bits=4, stat_group_size=64), 0.5, 0.1, {}),
    "spqr-w4-g32-s4-sg64-t0.5-damp0.1-noact": (dict(bits=4, group_size=32, stat_bits=4, stat_group_size=64,
                                                 act_order=False), 0.5, 0.1, {}),
}
GPTQ = {"gptq-w4-g128": (4, 128), "gptq-w3-g64": (3, 64)}


def hessians(dataset):
    """Layer name -> (H [K, K] of ``dataset``'s 32 x 256 tokens through the float model, W [N, K])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    src = smollm2_checkpoint()
    batches = get_calibration_batches(AutoTokenizer.from_pretrained(src), dataset, n_samples=32, seq_len=256)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mods = {}
    for b in BLOCKS:
        blk = model.model.layers[b]
        mods.update({f"{b}.q_proj": blk.self_attn.q_proj, f"{b}.o_proj": blk.self_attn.o_proj,
                     f"{b}.up_proj": blk.mlp.up_proj, f"{b}.down_proj": blk.mlp.down_proj})
    H, count = {n: 0 for n in mods}, {n: 0 for n in mods}

    def hook(name):
        def f(_, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            H[name] = H[name] + x.t() @ x
            count[name] += x.shape[0]
        return f

    for n, m in mods.items():
        m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        for b in batches:
            model(b)
    return {n: (2 * H[n] / count[n], m.weight.data.clone()) for n, m in mods.items()}


def _geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def table(path: str) -> str:
    """The README table of a results file: one row per configuration, best held-out error first."""
    with open(path) as f:
        summary = json.load(f)["summary"]
    rows = ["| configuration | bits/weight (these 16 layers) | error, calibration Hessians | "
            "error, held-out Hessians | held-out vs GPTQ 4-bit g128 (geomean over layers) | worst layer |",
            "|---|---|---|---|---|---|"]
    for k, v in sorted(summary.items(), key=lambda kv: kv[1]["error_held_out_geomean"]):
        rows.append(f"| {k} | {v['bits_per_weight']:.3f} | {v['error_geomean']:.3e} | "
                    f"{v['error_held_out_geomean']:.3e} | {v['held_out_vs_gptq_w4_g128']:.2f}x | "
                    f"{v['held_out_vs_gptq_w4_g128_worst']:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spqr_layer_error.json")
    if "--out" in sys.argv:  # another results file (another calibration / held-out pair)
        out = sys.argv[sys.argv.index("--out") + 1]
    if "--table" in sys.argv:
        print(table(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", default=None, help=f"SpQR configurations (default all: {list(CONFIGS)})")
    ap.add_argument("--held-out", default="mixed", help="bundled text whose Hessians score generalisation")
    ap.add_argument("--calibration", default="shakespeare", help="bundled text every method quantizes on")
    ap.add_argument("--out", default=out, help="results file (default results/spqr_layer_error.json)")
    ap.add_argument("--merge", action="store_true", help="keep the other configurations already in the results file")
    args = ap.parse_args()
    configs = {k: CONFIGS[k] for k in (args.configs or CONFIGS)}
    torch.set_num_threads(1)
    if args.held_out == args.calibration:
        raise SystemExit(f"--held-out {args.held_out!r} is the calibration set: choose another bundled text")
    calib, held = hessians(args.calibration), hessians(args.held_out)
    per_layer: dict = {}
    for name, (h, w) in calib.items():
        h_out = held[name][0]

        def err(wq):
            d = wq - w
            return tuple(float(torch.trace(d @ hh @ d.t()) / torch.trace(w @ hh @ w.t())) for hh in (h, h_out))

        row = {}
        for label, (bits, gs) in GPTQ.items():
            spec = IntGroupSpec(bits, gs, False, True)
            c, s, z, g = gptq(w, h, spec, damp=0.01)
            layer = QuantLinear.from_codes(c, s, z, g, spec)
            row[label] = (*err(layer.dequantize()), spec.bits + spec.bits / spec.group_size + 16 / spec.group_size
                          + 32 / w.shape[0])
        for label, (fields, tau, damp, extra) in configs.items():
            spec = SpQRSpec(**fields)
            r = spqr(w, prepare_hessian(h, damp, spec.act_order), spec.bits, spec.group_size, spec.stat_bits,
                     spec.stat_group_size, tau, **extra)
            layer = SpQRLinear.from_codes(r, spec)
            row[label] = (*err(layer.dequantize()), spec.bits_per_weight(*w.shape, layer.n_outliers))
        per_layer[name] = dict(numel=w.numel(), **{k: dict(error=v[0], error_held_out=v[1], bits=round(v[2], 4))
                                                   for k, v in row.items()})
        print(name, {k: f"{v[0]:.3e} / {v[1]:.3e} @ {v[2]:.3f}" for k, v in row.items()}, flush=True)
    held_out = f"32 x 256 tokens of the bundled {args.held_out!r} set"
    calibration = f"32 x 256 tokens of the bundled {args.calibration!r} set"
    if args.merge and os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        # runs stored before --calibration existed named the default set, then the same Shakespeare text;
        # the GPTQ rows below must also come out equal (same Hessians)
        same_calib = old.get("calibration") in (calibration, "32 x 256 default-set tokens"
                                                if args.calibration == "shakespeare" else None)
        if old.get("held_out") != held_out or not same_calib:
            raise SystemExit(f"--merge: {out} was measured on other texts ({old.get('calibration')!r}, "
                             f"{old.get('held_out')!r})")
        for name, row in per_layer.items():
            old_row = old["layers"][name]
            for k, v in old_row.items():
                if k not in row:
                    row[k] = v
            for k in GPTQ:  # deterministic: the same numbers in every run
                if abs(old_row[k]["error"] - row[k]["error"]) > 1e-3 * row[k]["error"]:
                    raise SystemExit(f"--merge: {name} {k} differs from the stored run; rerun without --merge")
    labels = [k for k in next(iter(per_layer.values())) if k != "numel"]
    total = sum(v["numel"] for v in per_layer.values())
    ref = "gptq-w4-g128"
    summary = {k: dict(error_geomean=_geomean(v[k]["error"] for v in per_layer.values()),
                       error_held_out_geomean=_geomean(v[k]["error_held_out"] for v in per_layer.values()),
                       # per layer: this configuration's held-out error / GPTQ 4-bit g128's (geometric mean, worst)
                       held_out_vs_gptq_w4_g128=_geomean(v[k]["error_held_out"] / v[ref]["error_held_out"]
                                                         for v in per_layer.values()),
                       held_out_vs_gptq_w4_g128_worst=max(v[k]["error_held_out"] / v[ref]["error_held_out"]
                                                          for v in per_layer.values()),
                       bits_per_weight=round(sum(v[k]["bits"] * v["numel"] for v in per_layer.values()) / total, 4))
               for k in labels}
    for k, v in summary.items():
        print(f"{k:40s} error {v['error_geomean']:.3e}  held-out {v['error_held_out_geomean']:.3e} "
              f"({v['held_out_vs_gptq_w4_g128']:.2f}x g128, worst {v['held_out_vs_gptq_w4_g128_worst']:.2f}x)  "
              f"bits {v['bits_per_weight']:.3f}")
    with open(out, "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct", "blocks": BLOCKS, "calibration": calibration,
                   "held_out": held_out,
                   "metric": "tr(dW H dW^T) / tr(W H W^T); bits per weight everything counted (GPTQ: codes, fp16 "
                   "scales, packed zeros, g_idx)", "summary": summary, "layers": per_layer}, f, indent=1)


if __name__ == "__main__":
    main()

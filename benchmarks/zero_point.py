"""Integer vs float zero-points for data-free RTN on SmolLM2 (issue #14): weight error and perplexity.

SmolLM2-135M-Instruct here is dequantized from a Q4_1 GGUF: every run of 32 weights along
in_features holds at most 16 levels ``d * q + m`` with a float offset ``m``. A grid with a float
zero can sit on that lattice; the int_group format's integer zero cannot. This script fake-quantizes
every linear layer of the fp32 model (lm_head is tied to the embeddings and stays float) with each
grid method below and scores the model as ``benchmarks/quality.py`` does (first 2048 tokens of
every evaluation domain, window 512, stride 256; geometric mean of the four).

Methods (asymmetric, fp16 scale, zero as stored: integer, or an fp16 float):
  int-minmax      the int_group min-max grid (RTN's default)
  int-search      ``algorithms.grid.search_grid`` (RTN ``mse_clip=True``: least squares, integer zero)
  int-hqq-round   HQQ's half-quadratic zero, rounded to an integer
  float-minmax    min-max with a float zero
  float-hqq       ``algorithms.grid.hqq_float_grid`` (HQQ's solver, pure torch)
  float-ls        ``search_float_grid``: min-max, then Lloyd steps (least-squares scale and offset)
  float-ls-shrink the same with ranges shrunk by 0.95 / 0.9 as candidates
  float-hqq-ls    ``search_float_grid(start="hqq")``
  hqq-lib         hqq's own ``Quantizer.quantize`` (when hqq is importable), dequantized
plus ``g32`` variants of min-max (the GGUF's own group size).

    python benchmarks/zero_point.py [--methods ...] [--baselines-site /work/venv-baselines/lib/python3.11/site-packages]
Writes benchmarks/results/zero_point.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "zero_point.json")
sys.path.insert(0, HERE)


def _methods():
    from hfcompress.algorithms import grid as G

    def intq(fit):
        def f(b, bits):
            s, z = fit(b, bits)
            return (G.quantize_to_codes(b, s, z, bits) - z[:, None]) * s[:, None]
        return f

    def floatq(fit):
        def f(b, bits):
            s, z = fit(b, bits)
            return (G.quantize_to_codes_float_zero(b, s, z, bits) - z[:, None]) * s[:, None]
        return f

    def hqq_round(b, bits):
        s, z = G.hqq_float_grid(b, bits, round_start=False)
        return s, z.round().clamp(0, (1 << bits) - 1)

    def hqq_lib(round_zero):
        def f(b, bits):
            from hqq.core.quantize import Quantizer

            wq, meta = Quantizer.quantize(b, nbits=bits, group_size=b.shape[1], axis=1, bitpack=False,
                                          round_zero=round_zero, compute_dtype=torch.float32, device="cpu")
            return Quantizer.dequantize(wq, meta).reshape(b.shape).float()
        return f

    return {
        "int-minmax": (64, intq(lambda b, bits: G.fit_grid(b, bits, False))),
        "int-search": (64, intq(lambda b, bits: G.search_grid(b, bits))),
        "int-hqq-round": (64, intq(hqq_round)),
        "float-minmax": (64, floatq(G.minmax_float_grid)),
        "float-hqq": (64, floatq(lambda b, bits: G.hqq_float_grid(b, bits, round_start=False))),
        "float-ls": (64, floatq(lambda b, bits: G.search_float_grid(b, bits))),
        "float-ls-shrink": (64, floatq(lambda b, bits: G.search_float_grid(b, bits, shrink=(1.0, 0.95, 0.9)))),
        "float-hqq-ls": (64, floatq(lambda b, bits: G.search_float_grid(b, bits, start="hqq"))),  # (round start)
        "hqq-lib": (64, hqq_lib(False)),
        # hqq's own 4-bit default (hqq_base_quant_config / BaseQuantizeConfig: round_zero=True for 4 bits)
        "hqq-lib-round-zero": (64, hqq_lib(True)),
        "float-hqq-round-start": (64, floatq(lambda b, bits: G.hqq_float_grid(b, bits, round_start=True))),
        "float-hqq-round-start-tensor-stop": (64, floatq(
            lambda b, bits: G.hqq_float_grid(b, bits, round_start=True, stop="tensor"))),
        # the half-quadratic solver's knobs, from the integer start (hqq: p 0.7, beta 10, 20 iterations)
        "float-hqq-round-start-p0.5": (64, floatq(lambda b, bits: G.hqq_float_grid(b, bits, p=0.5))),
        "float-hqq-round-start-p1": (64, floatq(lambda b, bits: G.hqq_float_grid(b, bits, p=1.0))),
        "float-hqq-round-start-beta1": (64, floatq(lambda b, bits: G.hqq_float_grid(b, bits, beta=1.0))),
        "float-hqq-round-start-iters50": (64, floatq(lambda b, bits: G.hqq_float_grid(b, bits, iters=50))),
        "float-hqq-tensor-stop": (64, floatq(
            lambda b, bits: G.hqq_float_grid(b, bits, round_start=False, stop="tensor"))),
        "int-minmax-g32": (32, intq(lambda b, bits: G.fit_grid(b, bits, False))),
        "float-minmax-g32": (32, floatq(G.minmax_float_grid)),
    }


def lattice_stats(model) -> dict:
    """Distinct values per run of 16/32/64 weights along in_features (linear layers, first 4096 runs each)."""
    out = {}
    for g in (16, 32, 64):
        counts = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                b = m.weight.detach().reshape(-1, g)[:4096]
                counts.append(torch.tensor([len(torch.unique(r)) for r in b], dtype=torch.float32))
        c = torch.cat(counts)
        out[f"g{g}"] = {"mean_distinct": round(c.mean().item(), 3), "max_distinct": int(c.max()),
                        "share_at_most_16": round((c <= 16).float().mean().item(), 4)}
    return out


def run(methods: list[str], bits: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.calibration import eval_texts, tokenize_text
    from hfcompress.smollm2 import smollm2_checkpoint
    from quality import _perplexities

    torch.manual_seed(0)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    evals = {d: tokenize_text(tok, [t]) for d, t in eval_texts().items()}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    orig = {n: m.weight.detach().clone() for n, m in linears.items()}
    table = _methods()
    result = {"bits": bits, "lattice": lattice_stats(model), "entries": {}}
    for name in methods:
        if name == "fp32":
            fn = None
        else:
            g, fn = table[name]
        t0 = time.perf_counter()
        rel = []
        for n, m in linears.items():
            w = orig[n]
            if fn is None:
                m.weight.data.copy_(w)
                continue
            b = w.reshape(-1, g)
            with torch.no_grad():
                dq = fn(b, bits).reshape(w.shape)
            rel.append(((dq - w).pow(2).sum() / w.pow(2).sum()).item())
            m.weight.data.copy_(dq)
        q_s = time.perf_counter() - t0
        entry = {"group_size": None if fn is None else g, "quantize_s": round(q_s, 2)}
        if rel:
            entry["rel_weight_mse_geomean"] = float(f"{math.exp(sum(math.log(r) for r in rel) / len(rel)):.5g}")
        t1 = time.perf_counter()
        entry.update({f"ppl_{k}": v for k, v in _perplexities(model, evals).items()})
        entry["eval_s"] = round(time.perf_counter() - t1, 2)
        entry["loadavg"] = [round(v, 2) for v in os.getloadavg()]
        result["entries"][name] = entry
        print(name, json.dumps(entry), flush=True)
    return result


def table(path: str = RESULTS) -> str:
    """Markdown table of a results file (one section per bit width)."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for key, res in data.items():
        e = res["entries"]
        doms = [k[4:] for k in next(iter(e.values())) if k.startswith("ppl_")]
        out.append(f"{key}: commit {res['commit']}, {res['date_utc']} UTC, load {min(r['loadavg'][0] for r in e.values())}"
                   f"-{max(r['loadavg'][0] for r in e.values())}; lattice: "
                   + ", ".join(f"{g} {v['mean_distinct']} distinct values per run (max {v['max_distinct']})"
                               for g, v in res["lattice"].items()))
        out.append("")
        out.append("| method | group | rel. weight MSE (geomean) | " + " | ".join(f"ppl {d}" for d in doms)
                   + " | quantize s |")
        out.append("|---|---|---|" + "---|" * len(doms) + "---|")
        for name, r in e.items():
            out.append(f"| {name} | {r['group_size'] or '-'} | {r.get('rel_weight_mse_geomean', '-')} | "
                       + " | ".join(f"{r[f'ppl_{d}']:.3f}" for d in doms) + f" | {r['quantize_s']} |")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--baselines-site", default=None,
                    help="a site-packages folder appended to sys.path for hqq (e.g. /work/venv-baselines/...)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return
    if args.baselines_site:
        sys.path.append(args.baselines_site)
    methods = args.methods or ["fp32"] + list(_methods())
    try:
        import hqq  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m != "hqq-lib"]
    torch.set_num_threads(2)
    res = run(methods, args.bits)
    res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=HERE).stdout.strip()
    res["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    res["python"] = sys.executable
    prev = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            prev = json.load(f)
    prev[f"w{args.bits}"] = res
    with open(args.out, "w") as f:
        json.dump(prev, f, indent=1)


if __name__ == "__main__":
    main()

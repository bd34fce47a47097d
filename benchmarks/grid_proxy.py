"""Per-layer proxy for choosing a data-free grid: relative output error of quantized SmolLM2 linear
layers on held-out activations of every evaluation domain (no perplexity run).

For a subset of decoder blocks, ``H_d = X^T X`` of every linear layer's input is accumulated on
tokens of each evaluation domain that the quality benchmark does not score (its windows are the
first 2048 tokens; these are tokens 3072..4096). Each grid method quantizes the layer's weight
(int_group, asymmetric, integer zeros, fp16 scales) and is scored by
``e_{l,d} = tr(dW H_d dW^T) / tr(W H_d W^T)``; the summary is the geometric mean over layers and
domains (and per domain). Methods that use activation statistics ("oracle", and GPTQ's Hessian)
read a *different* token range (6144..7168) of the same domains; data-free ones read only the
weights. GPTQ rows (act-order, damp 0.01) compare its grid fits: min-max, the searched grid weighted
by 1 / [H^-1]_jj (GPTQ's own cost of a column's error), the same search unweighted.

    python benchmarks/grid_proxy.py --bits 4 --group-size 64
Writes benchmarks/results/grid_proxy.json (one entry per bits/group setting).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "grid_proxy.json")
EVAL_TOKENS = (3072, 4096)
ORACLE_TOKENS = (6144, 7168)
WINDOW = 512


def collect(model, tok, blocks: list[int], span: tuple[int, int]):
    """``{domain: {linear name: H [K, K] fp64}}`` for the linears of ``blocks`` on tokens ``span``."""
    from hfcompress.calibration import eval_texts, tokenize_text

    layers = {f"model.layers.{b}.{n}": m for b in blocks for n, m in model.model.layers[b].named_modules()
              if isinstance(m, torch.nn.Linear)}
    out = {}
    for domain, text in eval_texts().items():
        ids = tokenize_text(tok, [text])[span[0]:span[1]][None]
        H = {}

        def hook(name):
            def f(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1])
                H[name] = H.get(name, 0) + (x.T @ x).double()
            return f

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        with torch.no_grad():
            for i in range(0, ids.shape[1] - WINDOW + 1, WINDOW):
                model(ids[:, i:i + WINDOW])
        for h in handles:
            h.remove()
        out[domain] = H
    return out


def data_free_importance(model, name: str) -> torch.Tensor:
    """Estimated second moment of each input channel of linear ``name`` from the weights alone:
    the RMSNorm gain squared for the layers that read a norm's output (q/k/v, gate/up); for o_proj
    the squared norm of the matching v_proj row (times the gain); for down_proj the product of the
    matching gate and up rows' squared norms (times the gain). Shape [K]."""
    blk, kind = name.rsplit(".", 2)[0], name.rsplit(".", 1)[1]
    block = model.get_submodule(blk)
    g_in = block.input_layernorm.weight.detach().float()
    g_post = block.post_attention_layernorm.weight.detach().float()
    if kind in ("q_proj", "k_proj", "v_proj"):
        return g_in ** 2
    if kind in ("gate_proj", "up_proj"):
        return g_post ** 2
    if kind == "o_proj":
        cfg = model.config
        hd = cfg.hidden_size // cfg.num_attention_heads
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        v = block.self_attn.v_proj.weight.detach().float()
        per_v = ((v * g_in) ** 2).sum(1)                                  # [kv_heads * hd]
        heads = torch.arange(cfg.num_attention_heads).repeat_interleave(hd) // rep
        return per_v[heads * hd + torch.arange(cfg.num_attention_heads * hd) % hd]
    if kind == "down_proj":
        gate = block.mlp.gate_proj.weight.detach().float()
        up = block.mlp.up_proj.weight.detach().float()
        return ((gate * g_post) ** 2).sum(1) * ((up * g_post) ** 2).sum(1)
    raise ValueError(f"no data-free importance for {name}")


def dequant(W: torch.Tensor, bits: int, g: int, fit) -> torch.Tensor:
    """Dequantized ``W [N, K]`` on per-(row, group) grids from ``fit(blocks [N*G, g]) -> (s, z)``."""
    from hfcompress.algorithms.grid import quantize_to_codes

    n, k = W.shape
    blocks = W.reshape(n * (k // g), g)
    s, z = fit(blocks)
    q = quantize_to_codes(blocks, s, z, bits)
    return ((q - z[:, None]) * s[:, None]).reshape(n, k)


def methods(bits: int, g: int, model, oracle: dict):
    from hfcompress.algorithms.grid import fit_grid, search_grid

    def tiled(imp, n, k):  # [K] column importance -> [N*G, g]
        return imp.reshape(1, k // g, g).expand(n, -1, -1).reshape(n * (k // g), g)

    def search(imp_of=None, **kw):
        def run(name, W):
            n, k = W.shape
            imp = None if imp_of is None else tiled(imp_of(name).float(), n, k)
            return dequant(W, bits, g, lambda b: search_grid(b, bits, importance=imp, **kw))
        return run

    out = {
        "minmax": lambda name, W: dequant(W, bits, g, lambda b: fit_grid(b, bits, False)),
        # fit_grid(mse_clip=True): since the searched grid replaced the shrink-factor search, the same as search-p2
        "mse_clip": lambda name, W: dequant(W, bits, g, lambda b: fit_grid(b, bits, False, mse_clip=True)),
        "search-p2": search(),
        "search-p2-noshrink": search(shrink=(1.0,)),
        "search-p1": search(p=1.0),
        "search-p0.7": search(p=0.7),
        "search-p2-datafree": search(lambda n: data_free_importance(model, n)),
        "search-p1-datafree": search(lambda n: data_free_importance(model, n), p=1.0),
        "search-p2-oracle": search(lambda n: oracle[n]),
    }
    try:
        from hqq.core.quantize import Quantizer

        def hqq(name, W):
            # as hqq's BaseQuantizeConfig sets it up: axis 1, optimized zero, rounded at 4 bits
            Wq, meta = Quantizer.quantize(W, nbits=bits, group_size=g, axis=1, optimize=True, round_zero=bits == 4,
                                          compute_dtype=torch.float32, device="cpu")
            return Quantizer.dequantize(Wq, meta).float().reshape(W.shape)
        out["hqq (fp16 zero)"] = hqq
    except ImportError:
        pass
    return out


def gptq_methods(bits: int, g: int, calib_H: dict):
    """GPTQ (act-order, damp 0.01) on the oracle tokens' H, with each grid-fitting choice."""
    from hfcompress.algorithms import gptq as G
    from hfcompress.algorithms.grid import search_grid
    from hfcompress.formats.int_group import IntGroupSpec

    spec = IntGroupSpec(bits=bits, group_size=g, act_order=True)

    def run(mse_clip, importance="inv_hessian"):
        def f(name, W):
            H = calib_H[name].float()
            grid = G.group_grid
            if importance == "uniform":  # the same search, unweighted
                G.group_grid = lambda Wg, u, spec, m: search_grid(Wg, spec.bits)
            try:
                codes, scale, zero, g_idx = G.gptq(W, H, spec, mse_clip=mse_clip)
            finally:
                G.group_grid = grid
            gi = g_idx.long()
            return (codes.float() - zero.float()[:, gi]) * scale[:, gi]
        return f

    return {"gptq-minmax": run(False), "gptq-search-invhessian": run(True),
            "gptq-search-uniform": run(True, "uniform")}


def synthetic(bits: int, g: int) -> dict:
    """Weight MSE relative to min-max on weights that never were quantized (seeded Gaussian and
    heavy-tailed), for the grids that need no activations: is a gap to HQQ on SmolLM2 the integer
    zero, or SmolLM2's weights (dequantized from a Q4_1 GGUF: 16 levels per 32 weights at a
    continuous offset, which a continuous zero can match)?"""
    from hfcompress.algorithms.grid import fit_grid, search_grid

    gen = torch.Generator().manual_seed(0)
    cases = {"gaussian": torch.randn(8192, g, generator=gen) * 0.02,
             "heavy-tailed": torch.randn(8192, g, generator=gen) * torch.exp(0.5 * torch.randn(8192, g, generator=gen))}
    out = {}
    for name, W in cases.items():
        ref = (dequant(W, bits, g, lambda b: fit_grid(b, bits, False)) - W).pow(2).mean().item()
        row = {"search-p2": (dequant(W, bits, g, lambda b: search_grid(b, bits)) - W).pow(2).mean().item() / ref}
        try:
            from hqq.core.quantize import Quantizer

            Wq, meta = Quantizer.quantize(W, nbits=bits, group_size=g, axis=1, optimize=True, round_zero=bits == 4,
                                          compute_dtype=torch.float32, device="cpu")
            row["hqq (fp16 zero)"] = (Quantizer.dequantize(Wq, meta).float().reshape(W.shape) - W).pow(2).mean().item() / ref
        except ImportError:
            pass
        out[name] = row
    return out


def table(path: str = RESULTS) -> str:
    """Markdown table of the results file: per setting, each method's relative output error
    (geometric mean, per domain) and weight MSE, relative to min-max."""
    with open(path) as f:
        data = json.load(f)
    lines = []
    for key, v in data.items():
        if key.startswith("synthetic-"):
            lines += [f"{key}: weight MSE relative to min-max on never-quantized weights", "",
                      "| weights | " + " | ".join(next(iter(v.values()))) + " |",
                      "|---|" + "---|" * len(next(iter(v.values())))]
            lines += [f"| {w} | " + " | ".join(f"{x:.3f}x" for x in r.values()) + " |" for w, r in v.items()]
            lines.append("")
            continue
        doms = [k[len("rel_out_err_"):] for k in next(iter(v["methods"].values())) if k.startswith("rel_out_err_")
                and k != "rel_out_err_geomean"]
        ref = v["methods"].get("minmax", {}).get("rel_out_err_geomean")
        gref = v["methods"].get("gptq-minmax", {}).get("rel_out_err_geomean")
        lines += [f"{key}: {v['layers']} linear layers of blocks {v['blocks']}, load {v['load'][0]:.1f}", "",
                  "| method | rel. output error (geomean) | vs min-max | " + " | ".join(doms) + " | rel. weight MSE |",
                  "|---|---|---|" + "---|" * len(doms) + "---|"]
        for m, r in v["methods"].items():
            base = gref if m.startswith("gptq-") else ref
            rel = f"{r['rel_out_err_geomean'] / base:.3f}x" if base else "n/a"
            lines.append(f"| {m} | {r['rel_out_err_geomean']:.5f} | {rel} | "
                         + " | ".join(f"{r['rel_out_err_' + d]:.5f}" for d in doms)
                         + f" | {r['rel_weight_mse_mean']:.5f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs="*", default=[0, 4, 8, 12, 16, 20, 24, 28])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    ap.add_argument("--synthetic", action="store_true", help="only the seeded never-quantized weights (seconds)")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    if args.synthetic:
        data = {}
        if os.path.isfile(args.out):
            with open(args.out) as f:
                data = json.load(f)
        data[f"synthetic-w{args.bits}-g{args.group_size}"] = synthetic(args.bits, args.group_size)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        print(table(args.out))
        return 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.smollm2 import smollm2_checkpoint

    torch.manual_seed(0)
    t0 = time.perf_counter()
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    H = collect(model, tok, args.blocks, EVAL_TOKENS)
    Ho = collect(model, tok, args.blocks, ORACLE_TOKENS)
    calib_H = {n: sum(Ho[d][n] for d in Ho) for n in next(iter(Ho.values()))}
    oracle = {n: h.diagonal() for n, h in calib_H.items()}
    names = list(next(iter(H.values())))
    collect_s = time.perf_counter() - t0
    res = {}
    todo = {**methods(args.bits, args.group_size, model, oracle), **gptq_methods(args.bits, args.group_size, calib_H)}
    for mname, fn in todo.items():
        if args.only and mname not in args.only:
            continue
        t1 = time.perf_counter()
        logs = {d: [] for d in H}
        wmse = []
        for name in names:
            W = model.get_submodule(name).weight.detach().float()
            dW = (fn(name, W) - W).double()
            wmse.append(dW.pow(2).mean().item() / W.double().pow(2).mean().item())
            for d in H:
                e = ((dW @ H[d][name]) * dW).sum() / ((W.double() @ H[d][name]) * W.double()).sum()
                logs[d].append(math.log(e.item()))
        per = {d: math.exp(sum(v) / len(v)) for d, v in logs.items()}
        res[mname] = {"rel_out_err_geomean": math.exp(sum(sum(v) for v in logs.values()) / sum(map(len, logs.values()))),
                      **{f"rel_out_err_{d}": v for d, v in per.items()},
                      "rel_weight_mse_mean": sum(wmse) / len(wmse), "seconds": round(time.perf_counter() - t1, 2)}
        print(f"{mname:22s} out-err geomean {res[mname]['rel_out_err_geomean']:.5f}  "
              + " ".join(f"{d} {v:.5f}" for d, v in per.items())
              + f"  w-mse {res[mname]['rel_weight_mse_mean']:.5f}  {res[mname]['seconds']} s", flush=True)
    key = f"w{args.bits}-g{args.group_size}"
    data = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            data = json.load(f)
    data[key] = {"blocks": args.blocks, "eval_tokens": EVAL_TOKENS, "oracle_tokens": ORACLE_TOKENS,
                 "layers": len(names), "collect_s": round(collect_s, 1), "load": os.getloadavg(),
                 "methods": {**data.get(key, {}).get("methods", {}), **res}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

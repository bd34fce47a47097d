"""A per-layer proxy for GPTQ's defaults (damping, act-order with g_idx vs static groups): seconds,
not the end-to-end runs of quality.py.

SmolLM2-135M-Instruct (fp32), the linear layers of the first BLOCKS decoder blocks (q_proj stands
for q/k/v, which share an input; o_proj; gate_proj for gate/up; down_proj), inputs captured from
the float model (no true-sequential propagation). Each layer is quantized by hfcompress GPTQ 4-bit
g64 with the Hessian of the default calibration set (32 x 256 tokens of `dataset=None`), then scored
on every evaluation domain by its relative output error there,
``tr(D H_d D^T) / tr(W H_d W^T)`` with ``D = W - Q`` and ``H_d`` the layer's input Hessian on the
first 2048 tokens of domain ``d``. Per configuration: the geometric mean of that error over the
layers, per domain, and over the domains the calibration set does not contain.

    python benchmarks/gptq_defaults_proxy.py        # writes results/gptq_defaults_proxy.json, prints the table
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "gptq_defaults_proxy.json")
BLOCKS = 2
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
CONFIGS = {
    "damp 0.01 (default)": dict(damp=0.01),
    "damp 0.05": dict(damp=0.05),
    "damp 0.1": dict(damp=0.1),
    "damp 0.01, static groups": dict(damp=0.01, static_groups=True),
}
CALIBRATED = ["hamlet"]  # the default set contains Shakespeare


class _Stop(Exception):
    pass


def _stop(*args):
    raise _Stop  # the blocks after the last measured one are not run


def _hessians(model, ids, names):
    """``2 X^T X / n`` of every named linear layer's input over ``ids [b, s]`` (float model)."""
    import torch

    H, n = {}, {}
    hooks = []
    for name in names:
        def pre(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H[name] = H.get(name, 0) + 2 * x.t() @ x
            n[name] = n.get(name, 0) + x.shape[0]
        hooks.append(model.get_submodule(name).register_forward_pre_hook(pre))
    last = model.model.layers[BLOCKS - 1]
    stop = last.register_forward_hook(_stop)
    try:
        with torch.no_grad():
            for row in ids.split(8):
                try:
                    model(row)
                except _Stop:
                    pass
    finally:
        for h in hooks + [stop]:
            h.remove()
    return {k: (v / n[k]).float() for k, v in H.items()}


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.algorithms.gptq import gptq
    from hfcompress.calibration import eval_texts, get_calibration_batches, tokenize_text
    from hfcompress.formats.int_group import IntGroupSpec, dequantize
    from hfcompress.nn.quant_linear import pack
    from hfcompress.smollm2 import smollm2_checkpoint

    t0 = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    names = [f"model.layers.{b}.{layer}" for b in range(BLOCKS) for layer in LAYERS]
    calib = torch.cat(get_calibration_batches(tok, None, n_samples=32, seq_len=256))        # [32, 256]
    H_cal = _hessians(model, calib, names)
    H_dom = {d: _hessians(model, tokenize_text(tok, [t])[:2048].reshape(4, 512), names)
             for d, t in eval_texts().items()}
    domains = list(H_dom)
    rows = {}
    for label, opts in CONFIGS.items():
        spec = IntGroupSpec(bits=4, group_size=64, sym=False, act_order=not opts.get("static_groups", False))
        errs = {d: [] for d in domains}
        for name in names:
            W = model.get_submodule(name).weight.detach().float()                                 # [N, K]
            res = gptq(W, H_cal[name], spec, damp=opts["damp"], static_groups=opts.get("static_groups", False))
            t = pack(*res, spec)
            Q = dequantize(t["weight"], t["weight_scale"], t.get("weight_zero"), t.get("weight_g_idx"), spec,
                           W.shape[1])
            D = (W - Q).double()
            for d in domains:
                Hd = H_dom[d][name].double()
                errs[d].append((torch.trace(D @ Hd @ D.t()) / torch.trace(W.double() @ Hd @ W.double().t())).item())
        gm = {d: math.exp(sum(math.log(e) for e in v) / len(v)) for d, v in errs.items()}
        free = [d for d in domains if d not in CALIBRATED]
        rows[label] = {"options": opts, "rel_output_error": gm,
                       "uncalibrated_geomean": math.exp(sum(math.log(gm[d]) for d in free) / len(free))}
    out = {"model": "SmolLM2-135M-Instruct (fp32)", "bits": 4, "group_size": 64, "layers": names,
           "calibration": "dataset=None, 32 x 256", "eval_tokens": 2048, "calibrated_domains": CALIBRATED,
           "seconds": round(time.perf_counter() - t0, 1), "load_before": load_before,
           "load_after": round(os.getloadavg()[0], 2), "configs": rows}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=1)
    print(table(out))
    return 0


def table(out: dict | None = None) -> str:
    if out is None:
        with open(RESULTS) as f:
            out = json.load(f)
    rows = out["configs"]
    doms = list(next(iter(rows.values()))["rel_output_error"])
    lines = ["| GPTQ 4-bit g64 | " + " | ".join(f"{d}{' (calibrated)' if d in out['calibrated_domains'] else ''}"
                                              for d in doms) + " | geomean, uncalibrated domains |",
             "|---|" + "---|" * (len(doms) + 1)]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r['rel_output_error'][d]:.5f}" for d in doms)
                     + f" | {r['uncalibrated_geomean']:.5f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(table())
        sys.exit(0)
    sys.exit(main())

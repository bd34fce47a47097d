"""A proxy for choosing SpQR's configuration (not the perplexity target itself): the output error
``tr(dW H dW^T) / tr(W H W^T)`` of single layers, SpQR configurations against GPTQ 4-bit g128 and
GPTQ 3-bit g64 on the same Hessians, with bits per weight everything counted.

Layers: q_proj, o_proj, up_proj, down_proj of SmolLM2-135M's blocks 0, 9, 19 and 29 (16 layers),
Hessians from 32 x 256 tokens of the default calibration set through the float model. Reported:
each configuration's geometric mean over the layers and its weighted bits per weight.
Writes benchmarks/results/spqr_layer_error.json.

    python benchmarks/spqr_layer_error.py
"""

from __future__ import annotations

import json
import math
import os

import torch

from hfcompress.algorithms.gptq import gptq
from hfcompress.algorithms.spqr import prepare_hessian, spqr
from hfcompress.calibration import get_calibration_batches
from hfcompress.formats.int_group import IntGroupSpec, QuantLinear
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec
from hfcompress.smollm2 import smollm2_checkpoint

BLOCKS = (0, 9, 19, 29)
# name -> (SpQRSpec fields, outlier threshold, damp)
CONFIGS = {
    "spqr-w3-g16-t2.0": (dict(), 2.0, 0.01),
    "spqr-w3-g16-sg32-t0.7": (dict(stat_group_size=32), 0.7, 0.01),
    "spqr-w3-g32-t0.5": (dict(group_size=32), 0.5, 0.01),
    "spqr-w3-g16-sg32-t0.7-damp0.1": (dict(stat_group_size=32), 0.7, 0.1),
    "spqr-w3-g16-sg32-t0.7-damp1.0": (dict(stat_group_size=32), 0.7, 1.0),
}


def hessians():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    src = smollm2_checkpoint()
    batches = get_calibration_batches(AutoTokenizer.from_pretrained(src), None, n_samples=32, seq_len=256)
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


def main() -> None:
    torch.set_num_threads(1)
    per_layer: dict = {}
    for name, (h, w) in hessians().items():
        def err(wq):
            d = wq - w
            return float(torch.trace(d @ h @ d.t()) / torch.trace(w @ h @ w.t()))

        row = {}
        for label, spec in (("gptq-w4-g128", IntGroupSpec(4, 128, False, True)),
                            ("gptq-w3-g64", IntGroupSpec(3, 64, False, True))):
            c, s, z, g = gptq(w, h, spec, damp=0.01)
            layer = QuantLinear.from_codes(c, s, z, g, spec)
            row[label] = (err(layer.dequantize()), spec.bits + spec.bits / spec.group_size + 16 / spec.group_size
                          + 32 / w.shape[0])
        for label, (fields, tau, damp) in CONFIGS.items():
            spec = SpQRSpec(**fields)
            r = spqr(w, prepare_hessian(h, damp, spec.act_order), spec.bits, spec.group_size, spec.stat_bits,
                     spec.stat_group_size, tau)
            layer = SpQRLinear.from_codes(r, spec)
            row[label] = (err(layer.dequantize()), spec.bits_per_weight(*w.shape, layer.n_outliers))
        per_layer[name] = dict(numel=w.numel(), **{k: dict(error=v[0], bits=round(v[1], 4)) for k, v in row.items()})
        print(name, {k: f"{v[0]:.3e} @ {v[1]:.3f}" for k, v in row.items()}, flush=True)
    labels = [k for k in next(iter(per_layer.values())) if k != "numel"]
    total = sum(v["numel"] for v in per_layer.values())
    summary = {k: dict(error_geomean=math.exp(sum(math.log(v[k]["error"]) for v in per_layer.values()) / len(per_layer)),
                       bits_per_weight=round(sum(v[k]["bits"] * v["numel"] for v in per_layer.values()) / total, 4))
               for k in labels}
    for k, v in summary.items():
        print(f"{k:32s} error {v['error_geomean']:.3e}  bits {v['bits_per_weight']:.3f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spqr_layer_error.json")
    with open(out, "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct", "blocks": BLOCKS, "calibration": "32 x 256 default-set tokens",
                   "metric": "tr(dW H dW^T) / tr(W H W^T); bits per weight everything counted (GPTQ: codes, fp16 "
                   "scales, packed zeros, g_idx)", "summary": summary, "layers": per_layer}, f, indent=1)


if __name__ == "__main__":
    main()

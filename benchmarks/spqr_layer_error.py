"""A proxy for the SpQR quality target (not the target itself): per-layer output error
``tr(dW H dW^T) / tr(W H W^T)`` of SpQR 3-bit g16 (outlier threshold 2.0) against GPTQ 4-bit g128
and GPTQ 3-bit g64 on SmolLM2-135M's first decoder block, same Hessians (32 x 256 bundled
calibration tokens), same damping. Writes benchmarks/results/spqr_layer_error.json.

    python benchmarks/spqr_layer_error.py
"""

import os
import torch, json
import hfcompress
from hfcompress.smollm2 import smollm2_checkpoint
from hfcompress.calibration import get_calibration_batches
from hfcompress.algorithms.gptq import gptq
from hfcompress.algorithms.spqr import prepare_hessian, spqr
from hfcompress.formats.int_group import IntGroupSpec, QuantLinear
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec
from transformers import AutoTokenizer, AutoModelForCausalLM
torch.manual_seed(0)
src = smollm2_checkpoint()
tok = AutoTokenizer.from_pretrained(src)
batches = get_calibration_batches(tok, None, n_samples=32, seq_len=256)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
blk = model.model.layers[0]
names = {"q_proj": blk.self_attn.q_proj, "o_proj": blk.self_attn.o_proj, "up_proj": blk.mlp.up_proj, "down_proj": blk.mlp.down_proj}
H = {n: 0 for n in names}; cnt = {n: 0 for n in names}
def hook(n):
    def f(m, inp):
        x = inp[0].reshape(-1, inp[0].shape[-1]).float()
        H[n] = H[n] + x.t() @ x; cnt[n] += x.shape[0]
    return f
hs = [m.register_forward_pre_hook(hook(n)) for n, m in names.items()]
model.model.layers = model.model.layers[:1]
with torch.no_grad():
    for b in batches: model(b)
res = {}
for n, m in names.items():
    h = H[n] / cnt[n]; w = m.weight.data.float()
    def err(wq): d = wq - w; return float(torch.trace(d @ h @ d.t()) / torch.trace(w @ h @ w.t()))
    out = {}
    for label, spec in (("gptq-w4-g128", IntGroupSpec(4, 128, False, True)), ("gptq-w3-g64", IntGroupSpec(3, 64, False, True))):
        c, s, z, g = gptq(w, h, spec, damp=0.01)
        out[label] = err(QuantLinear.from_codes(c, s, z, g, spec).dequantize())
    r = spqr(w, prepare_hessian(h, 0.01, True), outlier_threshold=2.0)
    L = SpQRLinear.from_codes(r, SpQRSpec())
    out["spqr-w3-g16-tau2"] = err(L.dequantize()); out["spqr_bpw"] = L.spec.bits_per_weight(L.out_features, L.in_features, L.n_outliers)
    res[n] = out; print(n, out, flush=True)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spqr_layer_error.json")
with open(out, "w") as f:
    json.dump({"model": "SmolLM2-135M-Instruct", "block": 0, "calibration": "32 x 256 bundled tokens",
               "metric": "tr(dW H dW^T) / tr(W H W^T)", "layers": res}, f, indent=1)
print("RESULT", json.dumps(res))

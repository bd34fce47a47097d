"""SpQR CPU path vs fp32 per layer at batch 1 (process CPU time, one thread, best of 5 x 300
calls): SmolLM2-135M layer shapes, random weights, bf16 activations on the SpQR int4 + sparse path,
fp32 nn.Linear as the baseline. Writes benchmarks/results/spqr_layer_speed.json.

    python benchmarks/spqr_layer_speed.py
"""

import json
import os
import time

import torch
import hfcompress
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec
torch.set_num_threads(1); torch.manual_seed(0)
res = {}
for n, k in ((576, 576), (1536, 576), (576, 1536)):
    w = torch.randn(n, k) * 0.05
    lay2 = SpQRLinear.from_float(w, None, SpQRSpec(act_order=False), outlier_threshold=2.0)
    x = torch.randn(1, k)
    lin = torch.nn.Linear(k, n, bias=False); lin.weight.data = w
    xb = x.bfloat16(); lb = lay2.to(torch.bfloat16)
    hfcompress.ops.set_cpu_fast_path("auto")
    with torch.no_grad():
        for f in (lambda: lin(x), lambda: lb(xb)): f()
        def t(f, r=300):
            best = 1e9
            for _ in range(5):
                t0 = time.process_time()
                for _ in range(r): f()
                best = min(best, (time.process_time() - t0) / r)
            return best
        a, b = t(lambda: lin(x)), t(lambda: lb(xb))
    res[f"{n}x{k}"] = dict(fp32_us=round(a*1e6,1), spqr_bf16_us=round(b*1e6,1), speedup=round(a/b,2), nnz=lay2.n_outliers)
    print(res[f"{n}x{k}"], flush=True)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spqr_layer_speed.json")
with open(out, "w") as f:
    json.dump({"what": "SpQR w3 g16 layer (bf16 activations, CPU fast path) vs fp32 nn.Linear, batch 1, "
               "process CPU time per call", "torch": torch.__version__, "layers": res}, f, indent=1)

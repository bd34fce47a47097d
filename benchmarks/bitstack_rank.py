"""BitStack's rank on a small model: relative weight error vs stored bits per weight of the
block prefixes, for ranks 1..16, on one layer of each kind of SmolLM2-135M-Instruct (block 10).
A per-layer proxy (seconds, no model run) for choosing ``rank`` in benchmarks/bitstack.py: each
block costs ``1 + 16 r (N + K) / (N K)`` bits per weight, which is large on 576-wide layers
(the paper's rank 16 is sized for 4096-wide ones).

    python benchmarks/bitstack_rank.py          # -> results/bitstack_rank.json, and a summary
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "bitstack_rank.json")
LAYERS = ["k_proj", "up_proj"]  # the narrowest and the widest kind
RANKS = [1, 4, 16]
BLOCKS = 5


def main() -> None:
    import numpy as np
    import torch
    from safetensors import safe_open

    from hfcompress.algorithms.bitstack import bitstack_decompose, reconstruct
    from hfcompress.smollm2 import smollm2_checkpoint

    src = smollm2_checkpoint()
    files = [os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors")]
    rows = []
    for kind in LAYERS:
        name = f"model.layers.10.{'mlp' if kind.endswith(('up_proj', 'down_proj')) else 'self_attn'}.{kind}.weight"
        for f in files:
            with safe_open(f, "pt") as fh:
                if name in fh.keys():
                    w = fh.get_tensor(name).float()
        n, k = w.shape
        s = torch.ones(k)
        for r in RANKS:
            signs, u, v, _ = bitstack_decompose(w, s, BLOCKS, r)
            per = 1 + 16 * r * (n + k) / (n * k)
            err = [float((reconstruct(signs[:b], u[:b], v[:b], s) - w).norm() / w.norm()) for b in range(1, BLOCKS + 1)]
            rows.append({"layer": name, "rank": r, "bits": [round(per * b, 4) for b in range(1, BLOCKS + 1)],
                         "rel_error": [round(e, 4) for e in err]})
    # error at 4 bits per weight (linear interpolation between prefixes), per rank, averaged over the layers
    at4 = {}
    for r in RANKS:
        at4[r] = round(float(np.mean([np.interp(4.0, x["bits"], x["rel_error"]) for x in rows if x["rank"] == r])), 4)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"rows": rows, "mean_rel_error_at_4_bits": at4}, f, indent=1)
    print("mean relative weight error at 4 bits per weight, by rank:", at4)


if __name__ == "__main__":
    main()

"""Layer-wise proxy for EoRA variants (diagnostic for ``benchmarks/eora_shrink.py``): how much of each
layer's quantization error ``ΔW Xᵀ`` a rank-r fix leaves on each evaluation domain's inputs.

One base (``gptq-w{bits}-g64`` of ``benchmarks/quality.py``) is compensated once (EoRA, block by block)
to keep every layer's calibration ``XᵀX``; each domain's ``X_dᵀX_d`` is taken from the float model's
layer inputs on that domain's evaluation tokens (the first 2048, as the perplexity uses). For each
variant of the solve the residual ``|| (ΔW - B A) X_dᵀ ||² / || ΔW X_dᵀ ||²`` per layer is compared with
plain SVD's: the table gives, per domain and layer kind, the mean log ratio (below 0: the variant
leaves less error than SVD) and the share of layers where it wins. Variants: ``svd``, ``shift:s``
(``XᵀX + s·mean(diag)·I``: ``EoRAConfig.shrinkage``), ``power:a`` (eigenvalues ``Λ^a``), ``diag:t``
(``(1-t) XᵀX + t·diag(XᵀX)``, its own eigendecomposition). No perplexity: a guide for which
variants to score with eora_shrink.py / quality.py.

    python benchmarks/eora_proxy.py --bits 4 --variants shift:0 shift:0.1 power:0.5 --out benchmarks/results/eora_proxy_w4.json
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
sys.path.insert(0, HERE)

import quality  # noqa: E402
from eora_shrink import capture_compensate, solve  # noqa: E402


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@torch.no_grad()
def domain_xtx(float_model, names: list[str], ids: torch.Tensor, window: int = 512) -> dict[str, torch.Tensor]:
    """``{layer: X_dᵀX_d}`` (fp64) of the float model's layer inputs on ``ids`` (non-overlapping windows)."""
    acc: dict[str, torch.Tensor] = {}
    mods = dict(float_model.named_modules())
    handles = []
    for n in names:
        def hook(m, args, out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc[n] = acc.get(n, 0) + (x.t() @ x).float()
        handles.append(mods[n].register_forward_hook(hook))
    try:
        for s in range(0, ids.numel() - 1, window):
            float_model(input_ids=ids[s:s + window][None])
    finally:
        for h in handles:
            h.remove()
    return acc


def residual(dwc: torch.Tensor, delta: torch.Tensor, energy: float, b, a, c) -> float:
    """``|| (ΔW - B A) Xᵀ ||²`` from ``C = XᵀX``, ``ΔW C`` and ``energy = || ΔW Xᵀ ||²`` (no [N, K] x [K, K] per call)."""
    b, a = b.double(), a.double()
    cross = float((b * (dwc @ a.t())).sum())  # tr(B A C ΔWᵀ)
    return energy - 2 * cross + float(((b.t() @ b) * (a @ c @ a.t())).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, choices=(3, 4), required=True)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import hfcompress
    from hfcompress.adapters.eora import delta_weight
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    src, tok, batches, evals = quality._setup()
    base_dir, _ = quality._cached_base(f"gptq-w{args.bits}-g64", src, batches, evals)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    cfg = hfcompress.EoRAConfig(rank=args.rank, dataset=torch.cat(batches), batch_size=8, shrinkage=0.0, **quality.CALIB)
    peft_model, stats = capture_compensate(model, float_model, cfg)
    inner = peft_model.base_model.model
    names = list(stats)
    doms = {d: domain_xtx(float_model, names, ids[: quality.EVAL["max_tokens"]]) for d, ids in evals.items()}
    doms["calibration"] = {n: stats[n][0].double() for n in names}
    res: dict = {v: {d: {} for d in doms} for v in ["svd"] + args.variants}
    t0 = time.perf_counter()
    for n in names:
        layer = inner.get_submodule(n)
        delta = delta_weight(layer.get_base_layer(), float_model.get_submodule(n), n)
        rank = layer.lora_A["default"].weight.shape[0]
        xtx, basis = stats[n]
        dw = delta.double()
        pre = {}
        for d, cs in doms.items():
            c = cs[n].double()
            dwc = dw @ c  # ΔW C  [N, K]
            pre[d] = (dwc, c, float((dwc * dw).sum()))
        for v in res:
            b, a = solve(v, delta, xtx, basis, rank)
            for d, (dwc, c, energy) in pre.items():
                res[v][d][n] = residual(dwc, dw, energy, b, a, c) / energy
    summary = {}
    for v in args.variants:
        for d in doms:
            by_kind: dict = {}
            for n in names:
                by_kind.setdefault(kind(n), []).append(math.log(res[v][d][n] / res["svd"][d][n]))
            by_kind["all"] = [x for xs in by_kind.values() for x in xs]
            summary.setdefault(v, {})[d] = {k: {"mean_log_ratio": round(sum(xs) / len(xs), 4),
                                                "wins": round(sum(x < 0 for x in xs) / len(xs), 3)}
                                            for k, xs in by_kind.items()}
            print(v, d, {k: s["mean_log_ratio"] for k, s in summary[v][d].items()}, flush=True)
    svd_left = {d: round(sum(res["svd"][d].values()) / len(names), 4) for d in doms}
    with open(args.out, "w") as f:
        json.dump({"base": f"gptq-w{args.bits}-g64", "rank": args.rank, "svd_mean_residual": svd_left,
                   "summary": summary, "solve_s": round(time.perf_counter() - t0, 1)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

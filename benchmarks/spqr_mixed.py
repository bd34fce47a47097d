"""Per-layer bit widths for SpQR under one bits-per-weight budget, chosen from calibration
statistics only: writes the ``module_formats`` table that ``benchmarks/quality.py``'s
``spqr-mixed-*`` entries quantize with.

Every linear layer of SmolLM2-135M's blocks gets one of a few SpQR levels (``LEVELS``: cheapest
first). The error a level adds to the model's loss is estimated per layer, additively, as
``1/2 sum_ij F_ij (Q(W) - W)_ij^2``: ``F`` is the diagonal empirical Fisher of the float model's
next-token loss (squared gradient of each calibration window's loss, summed over the windows),
``Q(W)`` the weight rounded on the level's stored grid (first-level groups in the level's column
order, scales on their second-level codes, no Hessian, no outliers: the same proxy for every
level). Then the allocation with the least summed estimate whose stored bits fit the budget
(``hfcompress.algorithms.evopress.proxy_allocation``: Lagrangian, then the bits left spent
greedily). Bits of a level: ``SpQRSpec.bits_per_weight`` without outliers; outliers are paid from
``--outlier-reserve`` bits per weight set aside from the budget.

Calibration windows: the 32 x 256 tokens of benchmarks/quality.py (the default calibration set,
seed 0); the evaluation texts are never read.

    python benchmarks/spqr_mixed.py --budget 3.6 --outlier-reserve 0.15 --out results/spqr_mixed_3.6.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from hfcompress.algorithms.evopress import proxy_allocation
from hfcompress.algorithms.spqr import fit_stored_grid, minmax_grid, quantize_stats
from hfcompress.formats.spqr import SpQRSpec

HERE = os.path.dirname(os.path.abspath(__file__))
CALIB = dict(n_samples=32, seq_len=256)  # benchmarks/quality.py's calibration windows
# name -> spec fields (second-level groups of --stat-group-size rows); cheapest first (bits per
# weight without outliers at 576 x 576, stat groups of 64: 3.26, 3.29, 3.46, 3.52, 4.29, 4.32)
LEVELS = {
    "w3-g32": dict(bits=3, group_size=32),
    "w3-g32-s4": dict(bits=3, group_size=32, stat_bits=4),
    "w3-g16": dict(bits=3, group_size=16),
    "w3-g16-s4": dict(bits=3, group_size=16, stat_bits=4),
    "w4-g32": dict(bits=4, group_size=32),
    "w4-g32-s4": dict(bits=4, group_size=32, stat_bits=4),
}


def stored_grid_rounding(w: torch.Tensor, spec: SpQRSpec, perm: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` rounded on ``spec``'s stored grid (columns grouped in the order ``perm``;
    no Hessian, no outliers) -> ``[N, K]`` in the original column order."""
    n, k = w.shape
    g, sg = spec.group_size, spec.stat_group_size
    if n % sg:
        raise ValueError(f"out_features={n} is not a multiple of stat_group_size={sg}")
    wp = w[:, perm].reshape(n, k // g, g).transpose(0, 1).reshape(-1, g)     # [G*N, g]: a stat group per group
    s1, _ = minmax_grid(wp, spec.bits)
    sc, ss, sz, _ = quantize_stats(s1, spec.stat_bits, sg)
    _, z, scale = fit_stored_grid(wp, torch.ones(g), sc, ss, sz, spec.bits, spec.stat_bits, sg)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]
    q = torch.clamp(torch.round(wp / safe) + z[:, None], 0, spec.maxq)
    deq = ((q - z[:, None]) * scale[:, None]).reshape(k // g, n, g).transpose(0, 1).reshape(n, k)
    out = torch.empty_like(deq)
    out[:, perm] = deq
    return out


def fisher_and_energy(model, windows: torch.Tensor, names: list[str]):
    """Diagonal empirical Fisher of each named linear weight (sum over windows of the squared
    gradient of the window's summed next-token loss) and each layer's input energy ``diag(X^T X)``
    (its act-order)."""
    mods = {n: model.get_submodule(n) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
    fisher = {n: torch.zeros_like(m.weight) for n, m in mods.items()}
    energy = {n: torch.zeros(m.in_features) for n, m in mods.items()}

    def add_energy(name):
        def hook(_, inp):
            energy[name] += inp[0].detach().reshape(-1, inp[0].shape[-1]).float().square().sum(0)
        return hook

    hooks = [m.register_forward_pre_hook(add_energy(n)) for n, m in mods.items()]
    try:
        for row in windows:                                                   # [T]
            ids = row[None]
            logits = model(input_ids=ids).logits.float()                      # [1, T, V]
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            grads = torch.autograd.grad(loss, [m.weight for m in mods.values()])
            for n, gr in zip(mods, grads):
                fisher[n] += gr.float().square()
    finally:
        for h in hooks:
            h.remove()
    return fisher, energy


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.calibration import get_calibration_batches
    from hfcompress.smollm2 import smollm2_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=3.6, help="average bits per weight, everything counted")
    ap.add_argument("--outlier-reserve", type=float, nargs="+", default=[0.12],
                    help="bits per weight set aside for the outliers (the dense levels get budget - reserve); "
                    "several: one table each (--out gets the first, the others '_r<reserve>' before .json)")
    ap.add_argument("--stat-group-size", type=int, default=64)
    ap.add_argument("--natural-order-4bit", action="store_true",
                    help="4-bit levels quantize in the natural column order (default: act-order, as the others)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "spqr_mixed_3.6.json"))
    ap.add_argument("--scores", default=None,
                    help="a table this script wrote: reuse its per-layer scores (same levels), allocate again")
    args = ap.parse_args()
    t0 = time.perf_counter()
    specs = {}
    for lv, fields in LEVELS.items():
        act = fields["bits"] < 4 or not args.natural_order_4bit
        specs[lv] = SpQRSpec(**fields, stat_group_size=args.stat_group_size, act_order=act)
    if args.scores:
        return reallocate(args, specs, t0)
    torch.manual_seed(0)  # as benchmarks/quality.py's _setup: the same calibration windows
    src = smollm2_checkpoint()
    batches = get_calibration_batches(AutoTokenizer.from_pretrained(src), None, batch_size=8, **CALIB)
    windows = torch.cat(batches)                                              # [32, 256]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    fisher, energy = fisher_and_energy(model, windows, names)
    t_fisher = time.perf_counter() - t0

    scores, cost, per_layer = [], [], {}
    for n in names:
        w = model.get_submodule(n).weight.detach()
        perm_act = torch.argsort(energy[n], descending=True)
        row_s, row_c = [], []
        for lv, spec in specs.items():
            perm = perm_act if spec.act_order else torch.arange(w.shape[1])
            dw = stored_grid_rounding(w, spec, perm) - w
            row_s.append(0.5 * float((fisher[n] * dw.square()).sum()))
            row_c.append(spec.bits_per_weight(*w.shape, nnz=0) * w.numel())
        scores.append(row_s)
        cost.append(row_c)
        per_layer[n] = dict(numel=w.numel(), shape=list(w.shape), fisher_sum=float(fisher[n].sum()),
                            score={lv: s for lv, s in zip(specs, row_s)})
    total = sum(v["numel"] for v in per_layer.values())
    for i, reserve in enumerate(args.outlier_reserve):
        path = args.out if i == 0 else args.out.replace(".json", f"_r{reserve:g}.json")
        write_table(path, args, reserve, names, specs, scores, cost, per_layer, total, t0, t_fisher)


def reallocate(args, specs, t0) -> None:
    """``--scores``: the per-layer scores of an earlier run, allocated again (e.g. another reserve)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfcompress.smollm2 import smollm2_checkpoint

    with open(args.scores) as f:
        old = json.load(f)
    if list(old["levels"]) != list(specs) or any(old["levels"][lv] != specs[lv].to_dict() for lv in specs):
        raise SystemExit(f"--scores {args.scores}: its levels differ from this script's ({list(old['levels'])})")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_checkpoint()))
    per_layer = old["per_layer"]
    names = list(per_layer)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    scores = [[per_layer[n]["score"][lv] for lv in specs] for n in names]
    cost = [[specs[lv].bits_per_weight(*shapes[n], nnz=0) * per_layer[n]["numel"] for lv in specs] for n in names]
    total = sum(v["numel"] for v in per_layer.values())
    for i, reserve in enumerate(args.outlier_reserve):
        path = args.out if i == 0 else args.out.replace(".json", f"_r{reserve:g}.json")
        write_table(path, args, reserve, names, specs, scores, cost, per_layer, total, t0, old["fisher_seconds"])


def write_table(path, args, reserve, names, specs, scores, cost, per_layer, total, t0, t_fisher) -> None:
    dense_budget = (args.budget - reserve) * total
    alloc = proxy_allocation(scores, cost, dense_budget)
    chosen = {n: list(specs)[a] for n, a in zip(names, alloc)}
    dense_bits = sum(cost[i][a] for i, a in enumerate(alloc)) / total
    base = list(specs).index("w3-g16")
    table = {n: {**LEVELS[lv], "stat_group_size": args.stat_group_size, "act_order": specs[lv].act_order}
             for n, lv in chosen.items() if lv != "w3-g16"}
    counts = {lv: sum(1 for v in chosen.values() if v == lv) for lv in specs}
    share = {lv: round(sum(per_layer[n]["numel"] for n, v in chosen.items() if v == lv) / total, 4) for lv in specs}
    out = {"model": "SmolLM2-135M-Instruct", "calibration": "32 x 256 tokens of the default calibration set (seed 0), "
           "benchmarks/quality.py's", "budget_bits_per_weight": args.budget, "outlier_reserve": reserve,
           "dense_bits_per_weight": round(dense_bits, 4),
           "uniform_w3_g16_dense_bits_per_weight": round(sum(c[base] for c in cost) / total, 4),
           "estimated_loss_increase": {"allocation": sum(scores[i][a] for i, a in enumerate(alloc)),
                                       "uniform_w3_g16": sum(s[base] for s in scores)},
           "levels": {lv: dict(spec.to_dict()) for lv, spec in specs.items()}, "layers_per_level": counts,
           "weights_per_level": share, "seconds": round(time.perf_counter() - t0, 1),
           "fisher_seconds": round(t_fisher, 1), "chosen": chosen, "per_layer": per_layer,
           "module_formats": table}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(path)
    print(json.dumps({k: v for k, v in out.items() if k not in ("chosen", "per_layer", "module_formats")}, indent=1))
    by_type: dict = {}
    for n, lv in chosen.items():
        by_type.setdefault(n.split(".")[-1], {}).setdefault(lv, []).append(int(n.split(".")[2]))
    for t, d in sorted(by_type.items()):
        print(t, {lv: blocks for lv, blocks in d.items()})


if __name__ == "__main__":
    main()

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

``--proxy spqr`` (the allocator that prices outliers): the estimate of a level is instead SpQR
itself run on the layer (``algorithms.spqr.spqr`` on the float model's calibration Hessian
``H = X^T X``, damping ``--damp``, outlier threshold ``--threshold``), scored as
``1/2 sum_n g_n (dW H dW^T)_nn`` with ``g_n = sum_k F_nk / tr(H)`` (the Fisher's output-row
weight: ``F_nk ~ g_n H_kk``), so GPTQ's error compensation and the outliers count; its bits are
the layer's stored bits *with its outliers*, so the whole budget is allocated (no reserve) and
each layer's outliers are priced against finer groups and 4-bit levels. Rows: every
``--row-sample``-th group of ``--stat-group-size`` rows (scores and outliers scaled back up).

Calibration windows: the 32 x 256 tokens of benchmarks/quality.py (the default calibration set,
seed 0); the evaluation texts are never read.

    python benchmarks/spqr_mixed.py --budget 3.6 --outlier-reserve 0.15 --out results/spqr_mixed_3.6.json
    python benchmarks/spqr_mixed.py --proxy spqr --cache C --levels                 # the Hessians (once)
    python benchmarks/spqr_mixed.py --proxy spqr --cache C --levels w3-g32 w3-g16 &  # levels side by side
    python benchmarks/spqr_mixed.py --proxy spqr --cache C --levels --out T.json     # the allocation
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from hfcompress.algorithms.evopress import proxy_allocation
from hfcompress.algorithms.spqr import fit_stored_grid, minmax_grid, prepare_hessian, quantize_stats, spqr
from hfcompress.formats.spqr import SpQRLinear, SpQRSpec

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


# layers that read one input share its Hessian (keyed by the first of them)
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def input_key(name: str) -> str:
    head, last = name.rsplit(".", 1)
    return f"{head}.{SHARED_INPUT.get(last, last)}"


def fisher_and_energy(model, windows: torch.Tensor, names: list[str], full: bool = False):
    """Diagonal empirical Fisher of each named linear weight (sum over windows of the squared
    gradient of the window's summed next-token loss) and each layer's input energy ``diag(X^T X)``
    (its act-order). ``full``: also ``X^T X [K, K]`` per input (:func:`input_key`), the third value."""
    mods = {n: model.get_submodule(n) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
    fisher = {n: torch.zeros_like(m.weight) for n, m in mods.items()}
    energy = {n: torch.zeros(m.in_features) for n, m in mods.items()}
    hess = {n: torch.zeros(m.in_features, m.in_features) for n, m in mods.items() if full and input_key(n) == n}

    def add_energy(name):
        def hook(_, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()            # [T, K]
            energy[name] += x.square().sum(0)
            if name in hess:
                hess[name].addmm_(x.t(), x)
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
    return (fisher, energy, hess) if full else (fisher, energy)


@torch.no_grad()
def spqr_estimate(w: torch.Tensor, H: torch.Tensor, g_row: torch.Tensor, spec: SpQRSpec, threshold: float,
                  damp: float, row_sample: int) -> tuple[float, float]:
    """SpQR of ``w [N, K]`` on ``H [K, K]`` (every ``row_sample``-th stat group of rows) ->
    (``1/2 sum_n g_n (dW H dW^T)_nn``, outliers), both scaled to all ``N`` rows."""
    n, k = w.shape
    rows = torch.arange(n).view(-1, spec.stat_group_size)[::row_sample].reshape(-1)   # [n'] whole stat groups
    res = spqr(w[rows], prepare_hessian(H, damp, spec.act_order), spec.bits, spec.group_size, spec.stat_bits,
               spec.stat_group_size, threshold)
    dw = SpQRLinear.from_codes(res, spec).dequantize(torch.float32) - w[rows]          # [n', K]
    err = ((dw @ H) * dw).sum(1)                                                       # [n'] output error per row
    scale = n / rows.numel()
    return 0.5 * float((g_row[rows] * err).sum()) * scale, res.outlier_rows.numel() * scale


def spqr_proxy(args, specs, t0) -> None:
    """``--proxy spqr``: per-layer SpQR estimates of the ``--levels`` not yet in the ``--cache``
    folder (one JSON per level, so several processes can estimate levels side by side once the
    Hessians are there), then, once every level is there, the allocation of the whole budget."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.calibration import get_calibration_batches
    from hfcompress.smollm2 import smollm2_checkpoint

    os.makedirs(args.cache, exist_ok=True)
    settings = dict(threshold=args.threshold, damp=args.damp, row_sample=args.row_sample)
    hpath = os.path.join(args.cache, "hessians.safetensors")
    src = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]

    def level_path(lv):
        return os.path.join(args.cache, f"{lv}.json")

    todo = [lv for lv in (specs if args.levels is None else args.levels) if not os.path.exists(level_path(lv))]
    if os.path.exists(hpath):
        stored = load_file(hpath)
        hess = {k[2:]: v for k, v in stored.items() if k.startswith("H:")}
        g_row = {k[2:]: v for k, v in stored.items() if k.startswith("g:")}
    elif todo or args.levels == []:
        torch.manual_seed(0)  # as benchmarks/quality.py's _setup: the same calibration windows
        batches = get_calibration_batches(AutoTokenizer.from_pretrained(src), None, batch_size=8, **CALIB)
        fisher, _, hess = fisher_and_energy(model, torch.cat(batches), names, full=True)
        g_row = {n: fisher[n].sum(1) / float(torch.diag(hess[input_key(n)]).sum()) for n in names}   # [N]
        del fisher
        save_file({**{f"H:{k}": v for k, v in hess.items()}, **{f"g:{k}": v for k, v in g_row.items()}}, hpath + ".tmp")
        os.replace(hpath + ".tmp", hpath)
        print(f"Fisher and Hessians: {time.perf_counter() - t0:.0f} s", flush=True)
    for lv in todo:
        t1, est = time.perf_counter(), {}
        for n in names:
            w = model.get_submodule(n).weight.detach()
            score, nnz = spqr_estimate(w, hess[input_key(n)], g_row[n], specs[lv], args.threshold, args.damp,
                                       args.row_sample)
            est[n] = dict(score=score, nnz=nnz)
        with open(level_path(lv), "w") as f:
            json.dump({**settings, "level": specs[lv].to_dict(), "seconds": round(time.perf_counter() - t1, 1),
                       "estimates": est}, f, indent=1)
        print(f"{lv}: {time.perf_counter() - t1:.0f} s, estimate {sum(e['score'] for e in est.values()):.1f}, "
              f"outliers {sum(e['nnz'] for e in est.values()):.0f}", flush=True)
    est = {}
    for lv in specs:
        if os.path.exists(level_path(lv)):
            with open(level_path(lv)) as f:
                got = json.load(f)
            if {k: got[k] for k in settings} != settings or got["level"] != specs[lv].to_dict():
                raise SystemExit(f"{level_path(lv)}: written with other settings ({got['level']}, "
                                 f"{ {k: got[k] for k in settings} })")
            est[lv] = got["estimates"]
    if todo or len(est) < len(specs):  # allocating is a run of its own (``--levels`` with none named)
        print(f"levels still to estimate: {[lv for lv in specs if lv not in est]}")
        return
    scores, cost, per_layer = [], [], {}
    for n in names:
        w = model.get_submodule(n).weight
        scores.append([est[lv][n]["score"] for lv in specs])
        cost.append([specs[lv].bits_per_weight(*w.shape, nnz=round(est[lv][n]["nnz"])) * w.numel() for lv in specs])
        per_layer[n] = dict(numel=w.numel(), shape=list(w.shape), score={lv: est[lv][n]["score"] for lv in specs},
                            nnz={lv: round(est[lv][n]["nnz"]) for lv in specs})
    total = sum(v["numel"] for v in per_layer.values())
    write_table(args.out, args, 0.0, names, specs, scores, cost, per_layer, total, t0, 0.0,
                extra=dict(proxy="spqr", **settings))


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
    ap.add_argument("--proxy", choices=("fisher", "spqr"), default="fisher",
                    help="fisher: rounding error weighted by the diagonal Fisher, outliers from a reserve; spqr: "
                    "SpQR run per layer and level, outliers priced (see the module docstring)")
    ap.add_argument("--threshold", type=float, default=0.6, help="--proxy spqr: the outlier threshold")
    ap.add_argument("--damp", type=float, default=0.1, help="--proxy spqr: SpQR's damping")
    ap.add_argument("--row-sample", type=int, default=2, help="--proxy spqr: every n-th stat group of rows")
    ap.add_argument("--levels", nargs="*", default=None,
                    help="--proxy spqr: estimate only these levels this run (none: only the Hessians)")
    ap.add_argument("--cache", default=None, help="--proxy spqr: folder of the Hessians and per-level estimates")
    args = ap.parse_args()
    t0 = time.perf_counter()
    specs = {}
    for lv, fields in LEVELS.items():
        act = fields["bits"] < 4 or not args.natural_order_4bit
        specs[lv] = SpQRSpec(**fields, stat_group_size=args.stat_group_size, act_order=act)
    if args.scores:
        return reallocate(args, specs, t0)
    if args.proxy == "spqr":
        if not args.cache:
            raise SystemExit("--proxy spqr needs --cache FOLDER")
        return spqr_proxy(args, specs, t0)
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


def write_table(path, args, reserve, names, specs, scores, cost, per_layer, total, t0, t_fisher,
                extra: dict | None = None) -> None:
    dense_budget = (args.budget - reserve) * total
    alloc = proxy_allocation(scores, cost, dense_budget)
    chosen = {n: list(specs)[a] for n, a in zip(names, alloc)}
    dense_bits = sum(cost[i][a] for i, a in enumerate(alloc)) / total  # with the outliers for --proxy spqr
    base = list(specs).index("w3-g16")
    table = {n: {**LEVELS[lv], "stat_group_size": args.stat_group_size, "act_order": specs[lv].act_order}
             for n, lv in chosen.items() if lv != "w3-g16"}
    counts = {lv: sum(1 for v in chosen.values() if v == lv) for lv in specs}
    share = {lv: round(sum(per_layer[n]["numel"] for n, v in chosen.items() if v == lv) / total, 4) for lv in specs}
    out = {"model": "SmolLM2-135M-Instruct", "calibration": "32 x 256 tokens of the default calibration set (seed 0), "
           "benchmarks/quality.py's", "budget_bits_per_weight": args.budget, "outlier_reserve": reserve,
           # --proxy spqr: the layers' stored bits with their estimated outliers
           ("estimated_bits_per_weight" if extra else "dense_bits_per_weight"): round(dense_bits, 4),
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

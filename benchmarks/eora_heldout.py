"""EoRA on text the quantizer never saw: which shrinkage generalises, judged on held-out calibration text.

GPTQ fits its weights on the calibration windows, so its error ``ΔW`` is smallest exactly where
those windows' activations are large: an EoRA solved on the same windows' ``XᵀX`` sees an
optimistically small error there and spends its rank elsewhere. Cross-validation on folds of those
same windows cannot see this (every fold was seen by GPTQ). Here the default calibration corpus is
cut twice: the ``fit`` windows (exactly ``benchmarks/quality.py``'s, the ones GPTQ calibrated on) and
as many ``held-out`` windows of the same corpus half-way between them (disjoint; GPTQ never saw them).

One block-by-block pass (as ``hfcompress.compensate``: each group solved at shrinkage ``--stats-shrinkage``
on the fit windows, compensated outputs fed forward) keeps every layer's fit and held-out ``XᵀX``. Then:

* per layer and per candidate (shrinkages ``--grid`` and plain SVD), the output error the fix fitted on
  the fit windows leaves on the held-out windows, ``tr((ΔW - B A) C_ho (ΔW - B A)ᵀ)``, relative to
  ``tr(ΔW C_ho ΔWᵀ)``: averaged over the layers per candidate (``mean_rel_error.ho``), and the same on
  the fit windows (``mean_rel_error.in``); GPTQ's own error on its fit windows over that on the held-out
  ones (``gptq_in_over_heldout_error``, same token count);
* rows scored on every evaluation domain (adapters rounded to fp16, as quality.py): ``svd``, ``fit:t``
  (solved on the fit windows), ``all:t`` (fit + held-out windows), ``ho:t`` (held-out windows only),
  ``chosen`` (each layer's candidate with the least held-out error, solved on the fit windows) and
  ``global`` (the one shrinkage with the least mean relative held-out error). ``ho:0.5`` is what
  ``EoRAConfig.window_offset=0.5`` (the default) became, up to the windows the earlier blocks were solved on.

No evaluation text is used to choose anything.

    python benchmarks/eora_heldout.py --bits 4 --out benchmarks/results/eora_heldout_w4.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import eora_shrink  # noqa: E402  (its row loop)
import quality  # noqa: E402  (same setup, bases, calibration and evaluation as the quality table)


def heldout_windows(tok, n: int, seq: int) -> torch.Tensor:
    """``[n, seq]`` windows of the default corpus half-way between ``get_calibration_batches``' windows
    (what ``EoRAConfig.window_offset=0.5`` became: :func:`hfcompress.calibration.data.cut_windows`)."""
    from hfcompress.calibration.data import cut_windows
    from hfcompress.calibration.data import load_texts, tokenize_text

    return cut_windows(tokenize_text(tok, load_texts(None)), n, seq, 0.5)


def capture(model, float_model, fit: torch.Tensor, ho: torch.Tensor, t0: float, batch_size: int):
    """Compensate (fit windows only, shrinkage ``t0``) block by block; returns the PeftModel and
    ``{layer: (XᵀX fit, XᵀX held-out)}`` (fp32; layers sharing an input share the tensors)."""
    import hfcompress
    from hfcompress.adapters import eora, eora_blocks

    seen: dict = {}
    orig_seq = eora_blocks.sequential_compensate_
    last: list = [None, None]  # fold list of the previous layer -> its solve basis

    def seq(inner, targets, batches, solve, adapter_name, **kw):
        def solve_fit(name, xtx, fold_xtx):
            layer = inner.get_submodule(name)
            delta = eora.delta_weight(layer.get_base_layer(), float_model.get_submodule(name), name)
            if last[0] is not fold_xtx:
                c = eora.shrink_to_diagonal(fold_xtx[0], t0)
                last[:] = [fold_xtx, (c, eora.activation_eigenbasis(c))]
                seen[name] = (fold_xtx[0].float(), fold_xtx[1].float())
            else:
                seen[name] = seen[next(reversed(seen))]
            c, basis = last[1]
            return eora.eora_compensation(delta, c, layer.lora_A["default"].weight.shape[0], basis=basis)

        kw.pop("folds", None)
        return orig_seq(inner, targets, batches, solve_fit, adapter_name, folds=2, **kw)

    cfg = hfcompress.EoRAConfig(rank=32, method="eora", dataset=torch.cat([fit, ho]), n_samples=fit.shape[0] * 2,
                                seq_len=fit.shape[1], batch_size=batch_size, shrinkage=t0)
    eora_blocks.sequential_compensate_ = seq
    try:
        peft_model = hfcompress.compensate(model, float_model, cfg)
    finally:
        eora_blocks.sequential_compensate_ = orig_seq
    return peft_model, seen


_BASES: dict = {}  # (id of XᵀX, t) -> (shrunk XᵀX, eigenbasis): layers sharing an input share it


def _solve(delta, xtx, t, rank):
    from hfcompress.algorithms.eora import activation_eigenbasis, eora_compensation, shrink_to_diagonal, svd_compensation

    if t == "svd":
        return svd_compensation(delta, rank)
    key = (id(xtx), float(t))
    if key not in _BASES:
        if len(_BASES) > 12:
            _BASES.clear()
        c = shrink_to_diagonal(xtx.double(), float(t))
        _BASES[key] = (c, activation_eigenbasis(c), xtx)  # xtx kept: its id stays unique while cached
    c, basis, _ = _BASES[key]
    return eora_compensation(delta, c, rank, basis=basis)


def _err(delta, b, a, h):
    e = delta.double() - b.double() @ a.double()
    return float(((e @ h.double()) * e).sum())


def _fit_scores(dw, c_fit, c_ho, rank, grid):
    """Output error on the held-out and on the fit windows of each candidate (``grid`` then plain SVD)
    solved on the fit windows. ``N <= K``: the fix is ``U Uᵀ ΔW`` with ``U`` the top-r eigenvectors of
    ``ΔW S ΔWᵀ`` (``S`` the shrunk ``XᵀX``; :mod:`hfcompress.algorithms.eora_cv`), so only ``[N, N]``
    matrices are decomposed; else the exact solve."""
    from hfcompress.algorithms.eora_cv import _top_eigvecs

    n, k = dw.shape
    h_ho, h_fit = c_ho.double(), c_fit.double()
    if n > k:
        fixes = [_solve(dw, c_fit, t, rank) for t in list(grid) + ["svd"]]
        return [_err(dw, b, a, h_ho) for b, a in fixes], [_err(dw, b, a, h_fit) for b, a in fixes]
    q_ho, q_fit = dw @ h_ho @ dw.t(), dw @ h_fit @ dw.t()  # ΔW C ΔWᵀ [N, N]
    q_d = (dw * h_fit.diagonal()) @ dw.t()
    us = [_top_eigvecs((1 - t) * q_fit + t * q_d, rank)[0] for t in grid] + [_top_eigvecs(dw @ dw.t(), rank)[0]]
    left = [lambda q, u=u: float(q.trace()) - float((u * (q @ u)).sum()) for u in us]  # tr((I - U Uᵀ) Q)
    return [f(q_ho) for f in left], [f(q_fit) for f in left]


@torch.no_grad()
def layer_errors(peft_model, float_model, stats, grid):
    """``{layer: {"ho": [...], "in": [...], "base_ho": e0, "base_in": e0}}`` per candidate (grid + svd)."""
    from hfcompress.adapters.eora import delta_weight

    inner = peft_model.base_model.model
    out = {}
    for name, (c_fit, c_ho) in stats.items():
        layer = inner.get_submodule(name)
        rank = layer.lora_A["default"].weight.shape[0]
        delta = delta_weight(layer.get_base_layer(), float_model.get_submodule(name), name).double()
        ho, fit = _fit_scores(delta, c_fit, c_ho, rank, grid)
        out[name] = {"ho": ho, "in": fit, "base_ho": float(((delta @ c_ho.double()) * delta).sum()),
                     "base_in": float(((delta @ c_fit.double()) * delta).sum())}
    return out


@torch.no_grad()
def resolve_(peft_model, float_model, stats, choice) -> None:
    """Re-solve every layer: ``choice(name) -> (which XᵀX: "fit" / "all" / "ho", candidate)``."""
    from hfcompress.adapters.eora import cast_lora_, delta_weight, set_lora_

    inner = peft_model.base_model.model
    sums: dict = {}
    for name, (c_fit, c_ho) in stats.items():
        layer = inner.get_submodule(name)
        rank = layer.lora_A["default"].weight.shape[0]
        delta = delta_weight(layer.get_base_layer(), float_model.get_submodule(name), name)
        which, t = choice(name)
        if which == "all" and (id(c_fit), id(c_ho)) not in sums:
            sums.clear()
            sums[(id(c_fit), id(c_ho))] = c_fit.double() + c_ho.double()
        xtx = {"fit": c_fit, "ho": c_ho}[which] if which != "all" else sums[(id(c_fit), id(c_ho))]
        set_lora_(layer, "default", *_solve(delta, xtx, t, rank))
    cast_lora_(peft_model, torch.float16, round_only=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, choices=(3, 4), required=True)
    ap.add_argument("--stats-shrinkage", type=float, default=0.5)
    ap.add_argument("--grid", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--rows", nargs="*", default=["svd", "fit:0.5", "chosen", "global", "all:0.5", "ho:0.5"])
    ap.add_argument("--budget-s", type=float, default=540, help="start no new row after this many seconds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    t_start = time.perf_counter()
    torch.set_num_threads(2)
    src, tok, batches, evals = quality._setup()
    base_dir, base_meta = quality._cached_base(f"gptq-w{args.bits}-g64", src, batches, evals)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    fit = torch.cat(batches)
    ho = heldout_windows(tok, fit.shape[0], fit.shape[1])
    t0 = time.perf_counter()
    peft_model, stats = capture(model, float_model, fit, ho, args.stats_shrinkage, 8)
    out = {"model": "SmolLM2-135M-Instruct", "base": f"gptq-w{args.bits}-g64", "base_dir": os.path.basename(base_dir),
           "rank": 32, "calibration": quality.CALIB, "heldout": "as many windows of the default corpus, half-way "
           "between the fit windows", "eval": quality.EVAL, "stats_shrinkage": args.stats_shrinkage,
           "layers": len(stats), "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                          text=True, cwd=HERE).stdout.strip(),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "capture_s": round(time.perf_counter() - t0, 1),
           **{f"base_{k}": v for k, v in base_meta.items() if k.startswith("ppl_")}}
    t0 = time.perf_counter()
    errs = layer_errors(peft_model, float_model, stats, args.grid)
    names = [str(t) for t in args.grid] + ["svd"]
    rel = {kind: [sum(r[kind][j] / r[f"base_{kind}"] for r in errs.values()) / len(errs) for j in range(len(names))]
           for kind in ("ho", "in")}
    out["errors_s"] = round(time.perf_counter() - t0, 1)
    # GPTQ's own optimism: its error on the windows it was fitted on over its error on unseen ones (same token count)
    ratios = sorted(r["base_in"] / r["base_ho"] for r in errs.values() if r["base_ho"] > 0)
    out["gptq_in_over_heldout_error"] = {"median": round(ratios[len(ratios) // 2], 4),
                                         "mean": round(sum(ratios) / len(ratios), 4)}
    out["mean_rel_error"] = {kind: dict(zip(names, [round(v, 5) for v in vals])) for kind, vals in rel.items()}
    pick = {n: names[min(range(len(names)), key=lambda j: r["ho"][j])] for n, r in errs.items()}
    counts: dict = {}
    for n, c in pick.items():
        kind = counts.setdefault(n.rsplit(".", 1)[-1], {})
        kind[c] = kind.get(c, 0) + 1
    out["chosen_counts"] = counts
    g = min(range(len(args.grid)), key=lambda j: rel["ho"][j])
    out["global_t"] = args.grid[g]
    print(json.dumps({k: out[k] for k in ("gptq_in_over_heldout_error", "mean_rel_error", "chosen_counts", "global_t")}),
          flush=True)
    with open(args.out + ".layers.json", "w") as f:  # per layer: for a per-layer criterion measured afterwards
        json.dump({"candidates": names, "layers": errs}, f)
    out["rows"] = []

    def as_t(c):
        return c if c == "svd" else float(c)

    def apply(row):
        if row == "svd":
            choice = lambda n: ("fit", "svd")  # noqa: E731
        elif row == "chosen":
            choice = lambda n: ("fit", as_t(pick[n]))  # noqa: E731
        elif row == "global":
            choice = lambda n: ("fit", args.grid[g])  # noqa: E731
        else:
            which, _, t = row.partition(":")
            choice = (lambda w, v: lambda n: (w, v))(which, as_t(t))
        resolve_(peft_model, float_model, stats, choice)

    eora_shrink.measure_rows(out, "row", list(args.rows), apply, peft_model, evals, args.out, t_start + args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""EoRA shrinkage sweep on SmolLM2-135M-Instruct: which ``EoRAConfig.shrinkage`` to default to.

EoRA solves each layer on the eigenspace of its calibration ``XᵀX``. Variants measured (see
:func:`solve`): the identity shift ``XᵀX + s · mean(diag XᵀX) · I`` (``--shrinkage s``: same
eigenvectors, eigenvalues shifted, from the paper's EoRA at ``s = 0`` toward plain SVD as ``s -> ∞``),
the eigenvalue power ``Λ^a`` and shrinkage toward the diagonal ``(1 - t) XᵀX + t diag(XᵀX)``
(``diag:t``, what ``EoRAConfig.shrinkage`` became). One base (``gptq-w{bits}-g64`` of
``benchmarks/quality.py``: GPTQConfig's defaults, the same cached checkpoint, the same calibration
and evaluation tokens) is compensated once, block by block as ``hfcompress.compensate`` does, with
``EoRAConfig.shrinkage = --stats-shrinkage`` (default 0: the paper's EoRA); every layer's ``XᵀX`` and
eigendecomposition are kept, and each variant then re-solves every layer from them (one SVD per
layer) and is scored on every evaluation domain, beside plain SVD (``method="svd"``) in the same run.
Only the variant the pass itself used is exactly what ``compensate`` gives; the others reuse its
inputs (the block-by-block pass feeds compensated outputs forward, so each would see slightly
different inputs): confirm the chosen value with ``benchmarks/quality.py``. Adapters are rounded to
fp16 before scoring, as quality.py does.

    python benchmarks/eora_shrink.py --bits 4 --shrinkage 0 0.1 0.3 1 --out benchmarks/results/eora_shrink_w4.json
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

import quality  # noqa: E402  (the same setup, bases, calibration and evaluation as the quality table)


def capture_compensate(model, float_model, config):
    """``hfcompress.compensate`` that also returns ``{layer name: (XᵀX, eigenbasis)}`` as it solved them."""
    import hfcompress
    from hfcompress.adapters import eora, eora_blocks

    seen: dict = {}
    last_basis: list = [None]
    orig_basis, orig_seq = eora.activation_eigenbasis, eora_blocks.sequential_compensate_

    def basis(xtx, rel_floor):
        last_basis[0] = orig_basis(xtx, rel_floor)
        return last_basis[0]

    def seq(inner, targets, batches, solve, adapter_name, **kw):
        def solve_and_keep(name, xtx):
            out = solve(name, xtx)
            prev = next(reversed(seen.values()), None)
            shared = prev is not None and prev[1] is last_basis[0]  # q/k/v, gate/up: one input, one basis
            seen[name] = (prev[0] if shared else xtx, last_basis[0])
            return out

        return orig_seq(inner, targets, batches, solve_and_keep, adapter_name, **kw)

    eora.activation_eigenbasis, eora_blocks.sequential_compensate_ = basis, seq
    try:
        peft_model = hfcompress.compensate(model, float_model, config)
    finally:
        eora.activation_eigenbasis, eora_blocks.sequential_compensate_ = orig_basis, orig_seq
    return peft_model, seen


def solve(variant, delta, xtx, basis, rank):
    """One layer's ``(B, A)`` for a variant: a float ``s`` (the identity shift), ``"svd"``, or the
    string forms ``"shift:s"`` (the same as ``s``), ``"power:a"`` (eigenvalues ``Λ^a``: 0 is SVD, 1 EoRA)
    and ``"diag:t"`` (``(1-t) XᵀX + t·diag(XᵀX)``, its own eigendecomposition)."""
    from hfcompress.algorithms.eora import activation_eigenbasis, eora_compensation, shrink_to_diagonal, svd_compensation

    if isinstance(variant, float):
        variant = f"shift:{variant}"
    form, _, v = variant.partition(":")
    if form == "svd":
        return svd_compensation(delta, rank)
    v = float(v)
    if form == "shift":  # same eigenvectors, eigenvalues + s·mean(diag XᵀX)
        q, lam, n = basis
        return eora_compensation(delta, xtx, rank, basis=(q, lam + v * xtx.diagonal().to(torch.float64).mean(), n))
    if form == "power":
        q, lam, n = basis
        return eora_compensation(delta, xtx, rank, basis=(q, lam ** v, n))
    if form == "diag":  # EoRAConfig.shrinkage
        c = shrink_to_diagonal(xtx, v)
        return eora_compensation(delta, c, rank, basis=activation_eigenbasis(c))
    raise SystemExit(f"unknown variant {variant!r}")


@torch.no_grad()
def resolve_(peft_model, float_model, stats: dict, variant) -> None:
    """Re-solve every compensated layer from its kept ``XᵀX`` (see :func:`solve` for ``variant``)."""
    from hfcompress.adapters.eora import cast_lora_, delta_weight, set_lora_

    inner = peft_model.base_model.model
    for name, (xtx, basis) in stats.items():
        layer = inner.get_submodule(name)
        rank = layer.lora_A["default"].weight.shape[0]
        delta = delta_weight(layer.get_base_layer(), float_model.get_submodule(name), name)
        set_lora_(layer, "default", *solve(variant, delta, xtx, basis, rank))
    cast_lora_(peft_model, torch.float16, round_only=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, choices=(3, 4), required=True)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--shrinkage", type=float, nargs="*", default=[], help="identity shifts s to score")
    ap.add_argument("--variants", nargs="*", default=[], help="other solves: power:a, diag:t (see solve())")
    ap.add_argument("--stats-shrinkage", type=float, default=0.0,
                    help="EoRAConfig.shrinkage of the block-by-block pass whose XᵀX every variant reuses")
    ap.add_argument("--no-svd", action="store_true", help="skip the plain-SVD row")
    ap.add_argument("--budget-s", type=float, default=660, help="start no new row after this many seconds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import hfcompress
    from transformers import AutoModelForCausalLM

    t_start = time.perf_counter()
    torch.set_num_threads(2)
    src, tok, batches, evals = quality._setup()
    base_dir, base_meta = quality._cached_base(f"gptq-w{args.bits}-g64", src, batches, evals)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    cfg = hfcompress.EoRAConfig(rank=args.rank, method="eora", dataset=torch.cat(batches), batch_size=8,
                                shrinkage=args.stats_shrinkage, **quality.CALIB)
    t0 = time.perf_counter()
    peft_model, stats = capture_compensate(model, float_model, cfg)
    out = {"model": "SmolLM2-135M-Instruct", "base": f"gptq-w{args.bits}-g64", "base_dir": os.path.basename(base_dir),
           "rank": args.rank, "calibration": quality.CALIB, "calibrated_domains": quality.CALIBRATED_DOMAINS,
           "eval": quality.EVAL, "stats_shrinkage": args.stats_shrinkage, "layers": len(stats),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=HERE).stdout.strip(),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "compensate_s": round(time.perf_counter() - t0, 1),
           **{f"base_{k}": v for k, v in base_meta.items() if k.startswith("ppl_")}, "rows": []}
    todo = ([] if args.no_svd else ["svd"]) + list(args.shrinkage) + list(args.variants)
    measure_rows(out, "shrinkage", todo, lambda s: resolve_(peft_model, float_model, stats, s), peft_model, evals,
                 args.out, t_start + args.budget_s)
    return 0


def measure_rows(out: dict, key: str, todo: list, apply, peft_model, evals, path: str, deadline: float) -> None:
    """For each ``todo`` label: ``apply(label)`` (sets the adapters), the perplexities of ``peft_model``
    on ``evals`` as a row of ``out["rows"]`` (``{key: label, ppl_*, seconds}``), ``out`` rewritten to
    ``path`` after every row; labels not reached by ``deadline`` (``time.perf_counter()``) go to
    ``out["skipped"]``. Then each row's perplexities over the ``"svd"`` row's (``vs_svd``)."""
    for label in todo:
        if time.perf_counter() > deadline:
            out["skipped"] = todo[todo.index(label):]
            break
        t1 = time.perf_counter()
        apply(label)
        row = {key: label, **{f"ppl_{k}": v for k, v in quality._perplexities(peft_model, evals).items()},
               "seconds": round(time.perf_counter() - t1, 1)}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    svd = next((r for r in out["rows"] if r[key] == "svd"), None)
    for r in out["rows"] if svd else []:
        r["vs_svd"] = {k[4:]: round(r[k] / svd[k], 4) for k in r if k.startswith("ppl_")}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""Why Compacter refuses a layer with a single output: on PEFT's only transformers-Conv1D test layer
(tests/test_custom_models.py's ModelEmbConv1D: Conv1D(nf=1, nx=5)) no initialisation that starts as the
identity (PEFT's convention) lets every factor move in PEFT's check test_only_params_are_updated.

The adapter ``h + up(act(down(h)))`` is written out here in pure torch (hfcompress refuses to build it):
with one output, n = d = 1 and every PHM weight is a product of scalars ``S * s * t``. The layer's outputs
are ~0.05 (GPT-2's init, std 0.02), so the gradient signal ``sum(g * h)`` is ~0.01, and the factor paired
with the zero one (needed for an exact identity start) only moves in proportion to that zero factor's
movement. Larger scales that help there overflow fp32 on PEFT's MLP (inputs up to 89; measured here
too). Each variant runs PEFT's procedure (3 SGD steps at lr 0.5 on ``arange(90).view(9, 10)``,
loss = sum of the outputs, "moved" = not allclose at atol = rtol = 1e-4) over ``--draws`` seeds of the
model and adapter (PEFT's own check runs one, seeded).

    python benchmarks/compacter_one_wide.py     # writes benchmarks/results/compacter_one_wide.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from hfcompress.adapters.compacter.layer import glorot_uniform_, phm_weight
from peft_battery import git_commit  # benchmarks/peft_battery.py


class ModelEmbConv1D(nn.Module):
    """PEFT 0.21.2 tests/test_custom_models.py ModelEmbConv1D (copied)."""

    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X, adapter=None):
        h = self.conv1d(self.emb(X))
        if adapter is not None:
            h = h + adapter(h)
        return self.sm(self.lin0(self.flat(self.relu(h))))


def factors(variant: str) -> dict[str, torch.Tensor]:
    """The adapter's parameters at initialisation (n = d = r = 1): S [1,1,1], s/t [1,1,1], biases [1]."""
    def glorot(scale=1.0):
        return glorot_uniform_(torch.empty(1, 1, 1)).mul_(scale)

    shared_std = {"default": 0.1, "S std 1": 1.0, "S std 3, factors x3": 3.0, "zero up-projection s": 0.1}[variant] \
        if variant != "plain adapter" else None
    scale = 3.0 if variant == "S std 3, factors x3" else 1.0
    p = {"down_s": glorot(scale), "down_t": glorot(scale), "up_s": glorot(scale), "up_t": glorot(scale),
         "down_bias": torch.zeros(1), "up_bias": torch.zeros(1)}
    if shared_std is not None:
        p["shared"] = torch.randn(1, 1, 1).mul_(shared_std)
    zero = "up_s" if variant == "zero up-projection s" else "down_s"
    p[zero].zero_()
    if variant == "plain adapter":  # a dense Houlsby adapter (no S, one weight per projection): t is not a parameter
        del p["down_t"], p["up_t"]
    return {k: nn.Parameter(v) for k, v in p.items()}


def adapter_fn(p: dict[str, torch.Tensor]):
    def weight(side):
        if "shared" not in p:
            return p[f"{side}_s"].reshape(1, 1)
        return phm_weight(p["shared"], p[f"{side}_s"], p[f"{side}_t"])

    return lambda h: F.gelu(h @ weight("down") + p["down_bias"]) @ weight("up") + p["up_bias"]


def run(variant: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = ModelEmbConv1D().requires_grad_(False)
    params = factors(variant)
    X = torch.arange(90).view(9, 10)
    with torch.no_grad():
        h = model.conv1d(model.emb(X))
    hh = h.clone().requires_grad_()
    g, = torch.autograd.grad(model.sm(model.lin0(model.flat(model.relu(hh)))).sum(), hh)
    fn = adapter_fn(params)
    assert torch.equal(model(X, fn), model(X))  # every variant starts as the exact identity
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(X, fn).sum().backward()
        opt.step()
    stuck = sorted(k for k, v in params.items() if torch.allclose(v, before[k], atol=1e-4, rtol=1e-4))
    return {"stuck": stuck, "finite": all(bool(torch.isfinite(v).all()) for v in params.values()),
            "h_std": h.std().item(), "sum_g_h": (g * h).sum().item()}


class MLP(nn.Module):
    """PEFT 0.21.2 tests/test_custom_models.py MLP (copied): 10 -> 20 -> 2 with dropout."""

    def __init__(self):
        super().__init__()
        self.lin0, self.relu, self.drop = nn.Linear(10, 20), nn.ReLU(), nn.Dropout(0.5)
        self.lin1, self.sm = nn.Linear(20, 2), nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


def mlp_overflows(init_std: float, seed: int) -> bool:
    """PEFT's test_parameters_after_loading_model on its MLP (the battery's row: Compacter on both linears,
    n=2, reduction_factor=2): does a parameter leave fp32's range in its 3 SGD steps at lr 0.5?"""
    from peft import get_peft_model

    from hfcompress.adapters.compacter import CompacterConfig

    torch.manual_seed(seed)
    model = get_peft_model(MLP(), CompacterConfig(target_modules=["lin0", "lin1"], n=2, reduction_factor=2,
                                                  init_std=init_std))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(X=torch.arange(90).view(9, 10)).sum().backward()
        opt.step()
    return not all(bool(torch.isfinite(p).all()) for p in model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compacter_one_wide.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    variants = ["default", "S std 1", "S std 3, factors x3", "zero up-projection s", "plain adapter"]
    out = {"what": __doc__.split("\n\n")[0], "draws": args.draws, "commit": git_commit(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                            time.gmtime()),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "variants": {}}
    for variant in variants:
        runs = [run(variant, seed) for seed in range(args.draws)]
        per_param = {}
        for r in runs:
            for k in r["stuck"]:
                per_param[k] = per_param.get(k, 0) + 1
        out["variants"][variant] = {"draws_with_a_stuck_parameter": sum(bool(r["stuck"]) for r in runs),
                                    "stuck_per_parameter": dict(sorted(per_param.items())),
                                    "non_finite": sum(not r["finite"] for r in runs),
                                    "seed0_stuck": runs[0]["stuck"]}
        print(f"{variant:24s} {out['variants'][variant]}", flush=True)
    # the other side of the scale: larger S overflows on PEFT's MLP (inputs up to 89), same draws
    out["mlp_draws_non_finite_by_init_std"] = {std: sum(mlp_overflows(std, seed) for seed in range(args.draws))
                                               for std in (0.1, 1.0, 3.0)}
    print("PEFT MLP, draws non-finite by S std:", out["mlp_draws_non_finite_by_init_std"], flush=True)
    runs = [run("default", seed) for seed in range(args.draws)]
    out["signal"] = {"h_std_median": sorted(r["h_std"] for r in runs)[len(runs) // 2],
                     "abs_sum_g_h_median": sorted(abs(r["sum_g_h"]) for r in runs)[len(runs) // 2]}
    out["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(out["signal"], f"wrote {args.out}")


if __name__ == "__main__":
    main()

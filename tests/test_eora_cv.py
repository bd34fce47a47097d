"""EoRA with the shrinkage chosen per layer by cross-validation (``EoRAConfig(shrinkage="cv")``,
:mod:`hfcompress.algorithms.eora_cv`): the held-out scores equal the direct solve-and-measure, the
choice follows the data (little data: shrink; plenty: don't), and in ``compensate`` a one-candidate
grid reproduces that fixed shrinkage bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import hfcompress
from hfcompress.adapters.eora import RECORD_KEY
from hfcompress.algorithms import eora_cv
from hfcompress.algorithms.eora import eora_compensation, output_error, shrink_to_diagonal, svd_compensation
from hfcompress.algorithms.eora_cv import SVD, choose_shrinkage, heldout_errors
from hfcompress.config import ConfigError
from tiny_models import inputs, llama_gqa, sqnr_db

GRID = (0.0, 0.25, 0.5, 1.0)


def _folds(n_folds=3, t=60, k=24, seed=0):
    """``XᵀX`` of ``n_folds`` folds of correlated, badly scaled inputs ``[K, K]`` (fp64)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -1.5, k, dtype=torch.float64)
    return [(lambda x: x.t() @ x)((torch.randn(t, k, generator=g, dtype=torch.float64) @ mix) * scales)
            for _ in range(n_folds)]


def _direct(dw, folds, rank):
    """The held-out errors by brute force: eora_compensation on the training folds, output_error on the held-out."""
    total = sum(folds)
    out = torch.zeros(len(GRID) + 1, dtype=torch.float64)
    for h in folds:
        for j, t in enumerate(GRID):
            b, a = eora_compensation(dw, shrink_to_diagonal(total - h, t), rank)
            out[j] += output_error(dw, b.double(), a.double(), h)
        out[-1] += output_error(dw, *svd_compensation(dw, rank), h)
    return out


@pytest.mark.parametrize("n_out", [16, 40])  # N <= K (output side) and N > K (input side)
def test_heldout_errors_equal_the_direct_solve(n_out):
    folds = _folds()
    dw = torch.randn(n_out, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = heldout_errors([dw], folds, [5], GRID, svd=True)[0]
    torch.testing.assert_close(got, _direct(dw, folds, 5), rtol=1e-6, atol=0)


def test_subspace_iteration_scores_match_exact_ones():
    """Large layers score the candidates after the first by warm-started subspace iteration: within
    1e-4 of the exact eigendecomposition here."""
    folds = _folds(n_folds=3, t=400, k=160, seed=2)
    dw = torch.randn(120, 160, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    approx = heldout_errors([dw], folds, [8], GRID, svd=True)
    old = eora_cv.OVERSAMPLE
    try:
        eora_cv.OVERSAMPLE = 10**6  # 2q >= n: exact eigh for every candidate
        exact = heldout_errors([dw], folds, [8], GRID, svd=True)
    finally:
        eora_cv.OVERSAMPLE = old
    torch.testing.assert_close(approx, exact, rtol=1e-4, atol=0)


def test_choice_follows_the_amount_of_data():
    """With few tokens per fold the correlations over-fit and cross-validation shrinks; with many
    it keeps the paper's EoRA (t = 0)."""
    dw = torch.randn(16, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    few = choose_shrinkage([dw], _folds(t=12, seed=5), [6], GRID + (SVD,))[0]
    many = choose_shrinkage([dw], _folds(t=4000, seed=5), [6], GRID + (SVD,))[0]
    assert few != 0.0 and many == 0.0, (few, many)
    assert choose_shrinkage([dw, dw], _folds(), [6, 6], (SVD,)) == [SVD, SVD]


def test_heldout_errors_reject_bad_input():
    dw = torch.zeros(4, 24)
    with pytest.raises(ValueError, match="at least 2 folds"):
        heldout_errors([dw], _folds(n_folds=1), [2], GRID)
    with pytest.raises(ValueError, match="grid"):
        heldout_errors([dw], _folds(), [2], (1.5,))
    with pytest.raises(ValueError, match=r"ΔW #0 has shape \(4, 23\)"):
        heldout_errors([torch.zeros(4, 23)], _folds(), [2], GRID)


# ------------------------------------------------------------------------------------------
# compensate(shrinkage="cv") on a tiny model
# ------------------------------------------------------------------------------------------

CALIB = inputs(batch=16, seq=48, seed=11)
HELD_OUT = inputs(batch=4, seq=31, seed=99)


@pytest.fixture(scope="module")
def llama_rtn3():
    orig = llama_gqa(seed=0)
    return orig, hfcompress.quantize_(copy.deepcopy(orig), hfcompress.RTNConfig(bits=3, group_size=32, mse_clip=True))


def _products(pm):
    return {n: m.lora_B["default"].weight @ m.lora_A["default"].weight
            for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}


def test_cv_with_one_candidate_is_that_fixed_shrinkage(llama_rtn3):
    orig, q = llama_rtn3
    fixed = hfcompress.compensate(copy.deepcopy(q), orig, hfcompress.EoRAConfig(rank=8, dataset=CALIB, shrinkage=0.25))
    cv = hfcompress.compensate(copy.deepcopy(q), orig, hfcompress.EoRAConfig(
        rank=8, dataset=CALIB, shrinkage="cv", cv_grid=[0.25], cv_folds=4))
    a, b = _products(fixed), _products(cv)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rec = cv.peft_config["default"].auto_mapping[RECORD_KEY]
    assert set(rec["cv_choices"].values()) == {0.25} and len(rec["cv_choices"]) == len(a)
    assert rec["config"]["shrinkage"] == "cv" and rec["config"]["cv_grid"] == [0.25] and rec["config"]["cv_folds"] == 4
    assert "cv_grid" not in fixed.peft_config["default"].auto_mapping[RECORD_KEY]["config"]  # records unchanged


def test_cv_compensate_chooses_per_layer_and_beats_svd(llama_rtn3):
    orig, q = llama_rtn3
    cv = hfcompress.compensate(copy.deepcopy(q), orig, hfcompress.EoRAConfig(rank=8, dataset=CALIB, shrinkage="cv"))
    svd = hfcompress.compensate(copy.deepcopy(q), orig, hfcompress.EoRAConfig(rank=8, method="svd"))
    choices = cv.peft_config["default"].auto_mapping[RECORD_KEY]["cv_choices"]
    assert set(choices.values()) <= {0.0, 0.25, 0.5, 0.75, 1.0, SVD} and len(choices) == len(_products(cv))
    with torch.no_grad():
        ref, got_cv, got_svd = (m(input_ids=HELD_OUT).logits.float() for m in (orig, cv, svd))
    assert sqnr_db(ref, got_cv) > sqnr_db(ref, got_svd) + 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(shrinkage="CV"), "shrinkage"),
    (dict(shrinkage="cv", cv_folds=1), "cv_folds"),
    (dict(shrinkage="cv", cv_folds=True), "cv_folds"),
    (dict(shrinkage="cv", cv_folds=40, n_samples=32), "cv_folds"),
    (dict(shrinkage="cv", cv_grid=[]), "cv_grid"),
    (dict(shrinkage="cv", cv_grid=[0.5, 2.0]), "cv_grid"),
    (dict(shrinkage="cv", cv_grid=["eora"]), "cv_grid"),
])
def test_cv_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        hfcompress.EoRAConfig(**kwargs)


def test_cli_shrinkage_cv():
    from hfcompress.cli.main import build_parser

    args = build_parser().parse_args(["compensate", "q", "--original", "f", "--shrinkage", "cv", "--out", "a"])
    assert args.shrinkage == "cv"
    assert build_parser().parse_args(["compensate", "q", "--original", "f", "--shrinkage", "0.3",
                                      "--out", "a"]).shrinkage == 0.3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compensate", "q", "--original", "f", "--shrinkage", "half", "--out", "a"])
    assert build_parser().parse_args(["compensate", "q", "--original", "f", "--window-offset", "0",
                                      "--out", "a"]).window_offset == 0.0

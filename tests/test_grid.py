"""The searched grid (algorithms.grid.search_grid): its weighted error against min-max's, the
importance weighting, ragged-group masks, determinism, and the same search inside GPTQ."""

import pytest
import torch

from hfcompress.algorithms.gptq import gptq
from hfcompress.algorithms.grid import fit_grid, quantize_to_codes, search_grid
from hfcompress.formats.int_group import SCALE_DTYPE, IntGroupSpec


def heavy_tailed(rows: int, g: int, seed: int) -> torch.Tensor:
    """Weights like an LLM's: per-row scale, heavy tails (a few large entries per group)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, g, generator=gen) * torch.exp(0.5 * torch.randn(rows, g, generator=gen))
    return w * torch.rand(rows, 1, generator=gen) * 0.05


def weighted_error(w, scale, zero, bits, d, p=2.0):
    q = quantize_to_codes(w, scale, zero, bits)
    return ((q - zero[:, None]) * scale[:, None] - w).abs().pow(p).mul(d).sum(1)


@pytest.mark.parametrize("bits,p,ratio", [(4, 2.0, 0.95), (3, 2.0, 0.9), (4, 1.0, 0.96)])
def test_search_grid_error_below_min_max(bits, p, ratio):
    w = heavy_tailed(512, 64, seed=bits)
    d = torch.ones_like(w)
    s0, z0 = fit_grid(w, bits, sym=False)
    s1, z1 = search_grid(w, bits, p=p)
    e0, e1 = weighted_error(w, s0, z0, bits, d, p), weighted_error(w, s1, z1, bits, d, p)
    assert torch.all(e1 <= e0 * (1 + 1e-6)), "min-max is a candidate: no row may get worse"
    assert e1.sum() < ratio * e0.sum()  # measured: 0.92 / 0.85 / 0.93
    # what is returned is what is stored: fp16 scales, integer zeros in range
    assert torch.equal(s1, s1.to(SCALE_DTYPE).float())
    assert torch.equal(z1, z1.round()) and int(z1.min()) >= 0 and int(z1.max()) <= (1 << bits) - 1


def test_search_grid_importance_weights_the_error():
    """Weighting columns (e.g. by input energy) lowers the weighted error below the unweighted
    search's: the grid spends its levels where the weight says error costs."""
    w = heavy_tailed(512, 64, seed=7)
    gen = torch.Generator().manual_seed(8)
    d = torch.exp(2.0 * torch.randn(64, generator=gen))[None, :]  # [1, g], broadcast over rows
    plain, weighted = search_grid(w, 4), search_grid(w, 4, importance=d)
    e_plain = weighted_error(w, *plain, 4, d.expand_as(w)).sum()
    e_weighted = weighted_error(w, *weighted, 4, d.expand_as(w)).sum()
    assert e_weighted < 0.85 * e_plain  # measured: 0.76


def test_search_grid_masked_entries_do_not_count_and_runs_are_identical():
    w = heavy_tailed(64, 32, seed=3)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, 24:] = False  # a ragged last group padded to 32
    a = search_grid(w, 3, mask=mask)
    w2 = w.clone()
    w2[:, 24:] = 100.0  # padding values must not change the grid
    b = search_grid(w2, 3, mask=mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = search_grid(w, 3, mask=mask)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_gptq_searched_grid_lowers_layer_output_error():
    """Inside GPTQ the searched grid (weighted by 1 / [H^-1]_jj) gives a lower layer objective
    tr(dW H dW^T) than the min-max grid, on a seeded layer with anisotropic inputs."""
    gen = torch.Generator().manual_seed(0)
    n, k = 96, 256
    X = torch.randn(2048, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
    H = 2 * X.t() @ X / X.shape[0]
    W = heavy_tailed(n, k, seed=1)
    spec = IntGroupSpec(bits=4, group_size=64, act_order=True)
    errs = {}
    for clip in (False, True):
        codes, scale, zero, g_idx = gptq(W, H, spec, mse_clip=clip)
        gi = g_idx.long()
        dW = (W - (codes.float() - zero.float()[:, gi]) * scale[:, gi]).double()
        errs[clip] = torch.trace(dW @ H.double() @ dW.t()).item()
    assert errs[True] < 0.97 * errs[False]


def test_rtn_searched_grid_below_min_max_on_every_layer_of_a_tiny_llama():
    """RTNConfig(mse_clip=True) (the searched grid) against min-max on a seeded tiny Llama: every
    quantized layer's squared weight error is at most min-max's, and the sum is lower."""
    import hfcompress
    from tiny_models import llama_gqa

    float_model = llama_gqa(seed=5)
    weights = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)}
    errs = {}
    for clip in (False, True):
        q = hfcompress.quantize_(llama_gqa(seed=5), hfcompress.RTNConfig(bits=4, group_size=32, mse_clip=clip))
        errs[clip] = {n: (m.dequantize(torch.float32) - weights[n]).pow(2).sum().item()
                      for n, m in q.named_modules() if isinstance(m, hfcompress.QuantLinear)}
    assert errs[True].keys() == errs[False].keys() and len(errs[True]) >= 7
    for n in errs[True]:
        assert errs[True][n] <= errs[False][n] * (1 + 1e-6), n
    assert sum(errs[True].values()) < 0.95 * sum(errs[False].values())

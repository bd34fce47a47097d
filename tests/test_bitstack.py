"""BitStack: sign-plane packing, the decomposition (error falls with every block), the CPU
matmul against the reference, BitStackConfig through quantize_ / save / reload bit-exact, the
stack (any prefix is a model), loading under a memory budget (only the blocks that fit are
read) and resize_ growing and shrinking in place."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import eora_sqnr_db, inputs, llama_gqa, sqnr_db
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.algorithms.bitstack import bitstack_decompose, reconstruct, top_singular
from hfcompress.formats import FormatError
from hfcompress.formats.bitstack import (
    BitStackConfig,
    BitStackLinear,
    BitStackSpec,
    bitstack_mm_ref,
    load_under_budget,
)
from hfcompress.formats.bitstack.op import bitstack_mm_cpu
from hfcompress.formats.bitstack.reference import pack_signs, unpack_signs
from hfcompress.formats.bitstack.stack import budget_range, model_bytes


@pytest.mark.parametrize("k", [1, 31, 32, 33, 100])
def test_sign_planes_round_trip(k):
    g = torch.Generator().manual_seed(k)
    neg = torch.rand(3, 5, k, generator=g) < 0.5
    words = pack_signs(neg)
    assert words.dtype == torch.int32 and words.shape == (3, 5, (k + 31) // 32)
    assert torch.equal(unpack_signs(words, k), neg)


@pytest.mark.parametrize("shape", [(96, 200), (200, 96)])
def test_top_singular_matches_the_full_svd(shape):
    """The randomized truncated SVD finds the dominant singular value and a rank-r approximation
    whose error is within 0.5% of the optimum (the full SVD's, Eckart-Young) on a nonnegative
    matrix (one dominant value, then a slowly decaying tail: the hard case for the sketch)."""
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(*shape, generator=g) @ torch.diag(torch.linspace(1, 0.01, shape[1])) @
         torch.randn(shape[1], shape[1], generator=g)).abs()
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    for r in (1, 4, 16):
        u, s, vh = top_singular(a, r)
        assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
        assert s[0] == pytest.approx(S[0].item(), rel=1e-5)
        best = (a - (U[:, :r] * S[:r]) @ Vh[:r]).norm().item()
        assert best * (1 - 1e-5) <= (a - (u * s) @ vh).norm().item() < 1.005 * best
    u2, s2, vh2 = top_singular(a, 4)
    assert torch.equal(s2, top_singular(a, 4)[1])  # seeded: the same result every call


def test_each_block_lowers_the_scaled_error_and_prefixes_reconstruct():
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    s = torch.rand(80) + 0.5
    signs, u, v, gain = bitstack_decompose(w, s, 5, 4)
    errs = [((reconstruct(signs[:i], u[:i], v[:i], s) - w) * s).pow(2).sum().item() for i in range(1, 6)]
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert (gain > 0).all() and gain.sum() < 1
    total = (w * s).pow(2).sum().item()
    assert errs[-1] == pytest.approx(total * (1 - gain.sum().item()), rel=1e-4)
    layer = BitStackLinear.from_decomposition(signs, u, v, s, gain, BitStackSpec(rank=4))
    assert torch.allclose(layer.dequantize(torch.float32), reconstruct(signs, u, v, s), atol=1e-5)


@pytest.mark.parametrize("m", [1, 7])
def test_cpu_matmul_matches_the_reference(m):
    torch.manual_seed(1)
    w = torch.randn(40, 70)
    layer = BitStackLinear.from_float(w, torch.randn(40), BitStackSpec(rank=6), n_blocks=3)
    x = torch.randn(2, m, 70)
    ref = bitstack_mm_ref(x, layer.weight, layer.weight_u, layer.weight_v, layer.weight_in_scale, layer.bias, 70)
    fast = bitstack_mm_cpu(x, layer.weight, layer.weight_u, layer.weight_v, layer.weight_in_scale, layer.bias, 70)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(layer(x), ref, rtol=1e-4, atol=1e-4)
    assert sqnr_db(x @ w.t(), layer(x) - layer.bias) > 3  # a real approximation of the weight


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 160, (4, 32), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = llama_gqa()
    cfg = BitStackConfig(rank=4, n_blocks=4)
    hfcompress.quantize_(model, cfg, batches=_batches())
    path = tmp_path_factory.mktemp("bitstack") / "m"
    model.save_pretrained(path)
    return model, path


def test_save_reload_bit_exact_and_quality_rises_with_blocks(saved, tmp_path):
    model, path = saved
    ids = inputs()
    with torch.no_grad():
        before = model(ids).logits
    re = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(re(ids).logits, before)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["format"] == "bitstack" and q["rank"] == 4
    ref = llama_gqa()
    with torch.no_grad():
        target = ref(ids).logits
    lo, full = budget_range(re)
    assert full == model_bytes(re)
    sqnr = []
    for frac in (0.0, 0.3, 0.6, 1.0):
        budget = int(lo + frac * (full - lo))
        m = load_under_budget(str(path), budget)
        assert budget - 3000 < model_bytes(m) <= budget  # within one block of the budget
        with torch.no_grad():
            sqnr.append(sqnr_db(target, m(ids).logits))
    assert all(b >= a for a, b in zip(sqnr, sqnr[1:])) and sqnr[-1] > sqnr[0]
    with torch.no_grad():  # every block: exactly the saved model (rotary buffers, tied head included)
        assert torch.equal(load_under_budget(str(path), full)(ids).logits, before)


def test_load_under_budget_reads_only_the_blocks_that_fit_and_resizes(saved, monkeypatch):
    model, path = saved
    lo, full = budget_range(model)
    half = (lo + full) // 2
    import safetensors

    sliced = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_slice(self, key):
            outer = self.f.get_slice(key)

            class S:
                def __getitem__(_, idx):
                    t = outer[idx]
                    sliced.append((key, t.shape[0] if t.dim() else 0))
                    return t
            return S()

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    small = load_under_budget(str(path), half)
    n_small = {n: m.n_blocks for n, m in small.named_modules() if isinstance(m, BitStackLinear)}
    assert min(n_small.values()) >= 1 and sum(n_small.values()) < 4 * len(n_small)
    assert sum(s for k, s in sliced if k.endswith(".weight")) == sum(n_small.values())  # nothing more read
    ids = inputs()
    # grow in place to the full model: the same logits as loading everything
    small.resize_(full)
    with torch.no_grad():
        assert torch.equal(small(ids).logits, AutoModelForCausalLM.from_pretrained(path)(ids).logits)
    # shrink back: the same as loading small directly
    small.resize_(half)
    again = load_under_budget(str(path), half)
    with torch.no_grad():
        assert torch.equal(small(ids).logits, again(ids).logits)
    with pytest.raises(FormatError, match="below the smallest bitstack model"):
        load_under_budget(str(path), lo - 1)


def test_config_budget_keeps_a_prefix_and_bad_fields_are_named():
    model = llama_gqa()
    full_cfg = BitStackConfig(rank=4, n_blocks=3, dataset=False)
    m_full = hfcompress.quantize_(llama_gqa(), full_cfg)
    lo, full = budget_range(m_full)
    budget = (lo + full) // 2
    hfcompress.quantize_(model, BitStackConfig(rank=4, n_blocks=3, memory_budget=budget, dataset=False))
    assert model_bytes(model) <= budget
    with pytest.raises(hfcompress.ConfigError, match="memory_budget='lots'"):
        BitStackConfig(memory_budget="lots")
    with pytest.raises(hfcompress.ConfigError, match="rank"):
        BitStackConfig(rank=0)


def test_lora_trains_on_top_of_bitstack_layers(saved):
    from peft import LoraConfig, get_peft_model

    _, path = saved
    model = AutoModelForCausalLM.from_pretrained(path)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ids = inputs()
    out = peft(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_eora_compensates_a_bitstack_model():
    orig = llama_gqa()
    q = hfcompress.quantize_(llama_gqa(), BitStackConfig(rank=4, n_blocks=1), batches=_batches())
    base, comp = eora_sqnr_db(orig, q)
    assert comp > base + 0.3

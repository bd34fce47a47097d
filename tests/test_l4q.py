"""L4Q: gradients of the quantization-aware LoRA function, and the PEFT method end to end
(train a few steps on tiny models, export to int_group, reload bit-exact, fresh process too)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import L4QConfig, QuantLinear, RTNConfig, quantize_
from hfcompress.algorithms.l4q import (l4q_linear, l4q_linear_naive, merged_weight, quantize_merged, step_grad_scale,
                                       stored_step, stored_zero)
from hfcompress.algorithms.rtn import rtn
from hfcompress.config import ConfigError
from hfcompress.formats.int_group import IntGroupSpec, default_g_idx
from tiny_models import gpt2, inputs, llama_gqa, qwen2



@contextlib.contextmanager
def _reference_op(device_type: str = "cpu"):
    """Run int_group_mm's reference (the spec) on ``device_type``: bit-exactness is defined against
    it; faster backends (e.g. a native bf16 CPU path) are free to round differently."""
    backends = sys.modules["hfcompress.ops.int_group_mm"]._BACKENDS
    saved = backends.pop(device_type, None)
    try:
        yield
    finally:
        if saved is not None:
            backends[device_type] = saved


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread (two OpenMP threads on a loaded 2-core machine spin-wait
    ~100x longer than the work); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GRID_CASES = [(3, False), (4, False), (3, True), (4, True), (2, False)]


def _layer_case(bits, sym, n=12, k=40, r=3, group_size=16, seed=0, dtype=torch.float32):
    """A tiny layer with a ragged last group (k=40, g=16), LoRA factors, steps shrunk so that
    some weights clip, and non-integer learned offsets."""
    g = torch.Generator().manual_seed(seed)
    spec = IntGroupSpec(bits=bits, group_size=group_size, sym=sym)
    w0 = torch.randn(n, k, generator=g)
    _, scale, zero, _ = rtn(w0, spec, mse_clip=False)
    step = (scale * 0.7).requires_grad_()
    zero = None if sym else (zero.float() + 0.3).requires_grad_()
    a = (torch.randn(r, k, generator=g) * 0.2).requires_grad_()
    b = (torch.randn(n, r, generator=g) * 0.2).requires_grad_()
    bias = torch.randn(n, generator=g).to(dtype).requires_grad_()
    x = torch.randn(2, 5, k, generator=g).to(dtype).requires_grad_()
    return spec, x, w0, a, b, step, zero, bias


def _params(x, a, b, step, zero, bias):
    return [t for t in (x, a, b, step, zero, bias) if t is not None]


def _rounding_bounds(spec, x, w0, a, b, step, zero, gy, scaling):
    """Per-element bounds on ``|custom - naive|`` for every gradient of ``_params``: float32 rounding only.

    Both backward passes compute the same sums on the same grid decisions (the forward's codes), in
    different orders (e.g. LSQ's ``G * (round(v) - v)`` vs autograd's ``G * (q - z) - G * v``). A
    sum of ``L`` float32 products differs from its exact value by at most ``L * u * sum|terms|``
    (``u = 2**-24``, Higham's gamma_L), so the two paths differ by at most twice that. ``L`` is the
    chain of reductions behind each gradient (``T`` tokens for ``G = dY^T X``, then ``N``, ``r`` or
    a group) plus ``_ELEMENTWISE`` roundings of elementwise steps (scale, mask, ``* s`` / ``/ s``).
    ``sum|terms|`` is the same computation on absolute values, in float64."""
    n, k = w0.shape
    t = gy.numel() // n
    u = 2.0 ** -24
    g_idx = default_g_idx(spec, k).long()
    s, z = stored_step(step), stored_zero(zero, spec, step)
    q, v, _ = quantize_merged(merged_weight(w0, a, b, scaling), s, z, spec, g_idx)
    s_k, z_k = s[:, g_idx].double(), z[:, g_idx].double()
    gy2, x2 = gy.reshape(-1, n).double().abs(), x.detach().reshape(-1, k).double().abs()
    g_abs = gy2.t() @ x2  # sum|terms| of G = dL/dW_q, [N, K]
    group = spec.effective_group_size(k)
    gs = step_grad_scale(spec, k)

    def group_sum(m):
        return torch.zeros(n, spec.n_groups(k), dtype=m.dtype).index_add_(1, g_idx, m)

    def bound(magnitude, length):
        return 2 * (length + _ELEMENTWISE) * u * magnitude

    mags = [
        (gy2.reshape(gy.shape) @ ((q.double() - z_k) * s_k).abs(), n),  # x: dY W_q
        (scaling * b.detach().double().abs().t() @ g_abs, t + n),  # A: a B^T (M*G)
        (scaling * g_abs @ a.detach().double().abs().t(), t + a.shape[0]),  # B: a (M*G) A^T
        # step: the naive path cancels G*(q - z) against G*v, so its terms are |q - z| + |v|
        (gs * group_sum(g_abs * ((q.double() - z_k).abs() + v.double().abs())), t + group),
    ]
    if zero is not None:  # zero: naive adds -G*s and +M*G*s (cancelling inside the range)
        mags.append((gs * s.double() * group_sum(2 * g_abs), t + group))
    mags.append((gy2.sum(0), t))  # bias
    return [bound(m, length) for m, length in mags]


_ELEMENTWISE = 6  # elementwise roundings allowed per chain (a few multiplies/divides, the mask)


@pytest.mark.parametrize("bits,sym", GRID_CASES, ids=[f"l4q-{b}bit-{'sym' if s else 'asym'}" for b, s in GRID_CASES])
def test_l4q_grad_matches_naive_autograd(bits, sym):
    """The custom backward equals plain autograd up to float32 rounding, over 16 layers and upstream
    gradients (the old fixed ``atol=1e-6`` failed about 1 case in 100 by rounding alone)."""
    for seed in range(16):
        spec, x, w0, a, b, step, zero, bias = _layer_case(bits, sym, seed=seed)
        y = l4q_linear(x, w0, a, b, step, zero, bias, 1.5, spec)
        y_ref = l4q_linear_naive(x, w0, a, b, step, zero, bias, 1.5, spec)
        assert torch.equal(y, y_ref)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1000 + seed))
        got = torch.autograd.grad(y, _params(x, a, b, step, zero, bias), gy)
        ref = torch.autograd.grad(y_ref, _params(x, a, b, step, zero, bias), gy)
        bounds = _rounding_bounds(spec, x, w0, a, b, step, zero, gy, 1.5)
        names = [name for name in ("x", "A", "B", "step", "zero", "bias") if not (sym and name == "zero")]
        for name, g1, g2, tol in zip(names, got, ref, bounds, strict=True):
            assert g2.abs().max() > 0, name  # every gradient is non-trivial in this case
            diff = (g1.double() - g2.double()).abs()
            worst = (diff - tol).argmax()
            assert (diff <= tol).all(), \
                f"seed {seed}, {name}: |custom - naive| = {diff.flatten()[worst]:.3g} > {tol.flatten()[worst]:.3g}"
        # The bounds stay far below what one weight on another grid point (a real forward/backward
        # mismatch) would change: W_q[n, k] moves by s[n, g], so dL/dx[:, k] by |dY[:, n]| * s[n, g].
        s = stored_step(step)[:, default_g_idx(spec, w0.shape[1]).long()]  # [N, K]
        flip_effect = gy.reshape(-1, w0.shape[0]).abs().amax(0)[:, None] * s  # [N, K]
        assert flip_effect.min() > 100 * bounds[0].max()


@pytest.mark.parametrize("bits,sym", GRID_CASES[:4], ids=[f"l4q-{b}bit-{'sym' if s else 'asym'}" for b, s in GRID_CASES[:4]])
def test_l4q_grad_explicit_formulas(bits, sym):
    """The paper's gradients written element by element (independently of the implementation)."""
    spec, x, w0, a, b, step, zero, bias = _layer_case(bits, sym, n=5, k=24, r=2, group_size=8)
    alpha = 2.0
    y = l4q_linear(x, w0, a, b, step, zero, bias, alpha, spec)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    d_a, d_b, d_step = torch.autograd.grad(y, [a, b, step], gy, retain_graph=True)
    d_zero = None if sym else torch.autograd.grad(y, [zero], gy)[0]

    n, k = w0.shape
    gs = spec.group_size
    q_p_max = spec.maxq if not sym else 2 ** (bits - 1) - 1
    gscale = 1.0 / (gs * q_p_max) ** 0.5
    G = gy.reshape(-1, n).double().t() @ x.detach().reshape(-1, k).double()  # dL/dW_q [N, K]
    W = (w0 + alpha * b.detach() @ a.detach()).double()
    s = step.detach().half().double()  # stored fp16 step
    z = torch.full_like(s, 2.0 ** (bits - 1)) if sym else torch.round(zero.detach()).clamp(0, spec.maxq).double()
    M = torch.zeros(n, k, dtype=torch.float64)
    ds = torch.zeros_like(s)
    dz = torch.zeros_like(s)
    for i in range(n):
        for j in range(k):
            grp = j // gs
            v = W[i, j] / s[i, grp]
            rz = torch.round(v) + z[i, grp]
            if rz < 0:  # clipped low: Q_N = -z
                ds[i, grp] += G[i, j] * (-z[i, grp])
                dz[i, grp] += G[i, j] * (-s[i, grp])
            elif rz > spec.maxq:  # clipped high: Q_P = maxq - z
                ds[i, grp] += G[i, j] * (spec.maxq - z[i, grp])
                dz[i, grp] += G[i, j] * (-s[i, grp])
            else:
                M[i, j] = 1.0
                ds[i, grp] += G[i, j] * (torch.round(v) - v)
    assert 0 < M.mean() < 1  # both regimes are exercised
    torch.testing.assert_close(d_a.double(), alpha * b.detach().double().t() @ (M * G), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_b.double(), alpha * (M * G) @ a.detach().double().t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_step.double(), gscale * ds, rtol=1e-4, atol=1e-5)
    assert step_grad_scale(spec, k) == pytest.approx(gscale)
    if not sym:
        torch.testing.assert_close(d_zero.double(), gscale * dz, rtol=1e-4, atol=1e-5)


def test_l4q_grad_finite_differences():
    """y is linear in x and bias: the analytic gradients match central differences (float64)."""
    spec, x, w0, a, b, step, zero, bias = _layer_case(4, False, n=6, k=24, group_size=8, dtype=torch.float64)
    x = x[:1, :2].detach().requires_grad_()

    def f(x_, bias_):
        return l4q_linear(x_, w0, a.detach(), b.detach(), step.detach(), zero.detach(), bias_, 1.5, spec)

    assert torch.autograd.gradcheck(f, (x, bias), eps=1e-6, atol=1e-7)


def test_l4q_backward_keeps_no_weight_sized_tensor():
    """Only x and the small factors are saved for backward: no merged weight, no weight gradient."""
    spec, x, w0, a, b, step, zero, bias = _layer_case(4, False, n=48, k=64, group_size=16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = l4q_linear(x, w0, a, b, step, zero, bias, 1.0, spec)
    weight_sized = [t for t in saved if t.shape == w0.shape]
    assert all(t.data_ptr() == w0.data_ptr() for t in weight_sized)  # only the frozen W0 itself
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        l4q_linear_naive(x, w0, a, b, step, zero, bias, 1.0, spec)
    assert sum(t.shape == w0.shape and t.data_ptr() != w0.data_ptr() for t in saved) >= 2  # what it avoids
    y.sum().backward()


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of tensors autograd keeps for backward that are not parameters (new memory)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return total


def test_l4q_training_memory_close_to_lora():
    from peft import LoraConfig

    ids = inputs(batch=4, seq=32)
    lora = get_peft_model(llama_gqa(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  lora_dropout=0.0))
    l4q = get_peft_model(llama_gqa(), L4QConfig(r=8, lora_alpha=16, bits=4, group_size=32))
    lora_bytes, l4q_bytes = _saved_activation_bytes(lora.train(), ids), _saved_activation_bytes(l4q.train(), ids)
    assert l4q_bytes <= 1.3 * lora_bytes, (l4q_bytes, lora_bytes)


@pytest.mark.usefixtures("exact_cpu_reference")  # L4Q fake-quantizes in fp32: bit-exact only against the reference
@pytest.mark.parametrize("init_scales", ["minmax", "mse"], ids=["l4q-init-minmax", "l4q-init-mse"])
def test_l4q_init_is_rtn(init_scales):
    """B = 0 at init: the L4Q model computes exactly the RTN-quantized model."""
    ids = inputs()
    pm = get_peft_model(llama_gqa(), L4QConfig(r=4, bits=4, group_size=32, init_scales=init_scales)).eval()
    rtn_model = quantize_(llama_gqa(), RTNConfig(bits=4, group_size=32, mse_clip=init_scales == "mse",
                                                 zero_point="int"))  # L4Q learns integer offsets
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, rtn_model(input_ids=ids).logits)


def _train(pm, ids, steps=6, lr=5e-3):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return pm.eval(), losses


CONFORMANCE = [("llama", 3, False, torch.float32), ("llama", 4, True, torch.float32),
               ("qwen2", 4, False, torch.float32), ("llama", 4, False, torch.bfloat16)]


@pytest.mark.parametrize("arch,bits,sym,dtype", CONFORMANCE,
                         ids=[f"l4q-{a}-{b}bit-{'sym' if s else 'asym'}-{str(d)[6:]}" for a, b, s, d in CONFORMANCE])
def test_l4q_train_export_reload_bitexact(arch, bits, sym, dtype, tmp_path):
    build = {"llama": llama_gqa, "qwen2": qwen2}[arch]
    build().save_pretrained(tmp_path / "base")  # loading in `dtype` keeps the rotary tables fp32, as a reload does

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)

    ids = inputs()
    pm = get_peft_model(base(), L4QConfig(r=4, lora_alpha=8, bits=bits, group_size=32, sym=sym))
    step0 = {n: p.detach().clone() for n, p in pm.named_parameters() if "l4q_step" in n}
    pm, losses = _train(pm, ids)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, step0[n]) for n, p in pm.named_parameters() if "l4q_step" in n)  # steps learned
    with torch.no_grad():
        trained = pm(input_ids=ids).logits

    out = hfcompress.l4q.export(pm, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, trained)  # export leaves the PEFT model as it was
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["algorithm"], qc["bits"], qc["group_size"], qc["sym"]) == ("l4q", bits, 32, sym)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not any("l4q" in k or "lora" in k for k in keys)
        assert f.get_tensor(next(k for k in keys if k.endswith("q_proj.weight"))).dtype == torch.int32

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    n_quant = sum(isinstance(m, QuantLinear) for m in reloaded.modules())
    assert n_quant == len(hfcompress.l4q.l4q_layers(pm)) == 14
    with torch.no_grad(), _reference_op():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)

    # the adapter itself (LoRA + steps + offsets) saves and reloads like any PEFT adapter
    pm.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, trained)

    merged = pm.merge_and_unload()
    assert not any("l4q" in n for n, _ in merged.named_modules())
    with torch.no_grad(), _reference_op():
        assert torch.equal(merged(input_ids=ids).logits, trained)


@pytest.mark.usefixtures("exact_cpu_reference")  # the reloaded QuantLinears must equal the fp32 fake-quant forward bit for bit
def test_l4q_export_fresh_process_reload(tmp_path):
    ids = inputs()
    pm, _ = _train(get_peft_model(llama_gqa(), L4QConfig(r=4, bits=3, group_size=32)), ids, steps=3)
    with torch.no_grad():
        trained = pm(input_ids=ids).logits
    hfcompress.l4q.export(pm, tmp_path / "q")
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = textwrap.dedent(f"""
        import hfcompress, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
        ids = load_file({str(tmp_path / 'ids.safetensors')!r})["ids"]
        with torch.no_grad():
            save_file({{"logits": m(input_ids=ids).logits}}, {str(tmp_path / 'out.safetensors')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], trained)


def test_l4q_merge_unmerge_roundtrip():
    ids = inputs()
    pm, _ = _train(get_peft_model(llama_gqa(), L4QConfig(r=4, bits=4, group_size=32)), ids, steps=2)
    layer = hfcompress.l4q.l4q_layers(pm)[0][1]
    w0 = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        pm.merge_adapter()
        assert torch.equal(layer.get_base_layer().weight, layer.to_quant_linear().dequantize())
        torch.testing.assert_close(pm(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        pm.unmerge_adapter()
        assert torch.equal(layer.get_base_layer().weight, w0)
        assert torch.equal(pm(input_ids=ids).logits, ref)


def test_l4q_second_merge_into_a_layer_is_refused_and_unmerge_restores_w0():
    """One quantized weight per layer: merging a second L4Q adapter on top of a merged one is refused
    (it used to overwrite the saved W0, so unmerge restored the first adapter's W_q instead)."""
    pm = get_peft_model(llama_gqa(), L4QConfig(r=4, bits=4, group_size=32, init_weights=False), adapter_name="a")
    pm.add_adapter("b", L4QConfig(r=4, bits=4, group_size=32, init_weights=False))
    layer = hfcompress.l4q.l4q_layers(pm)[0][1]
    w0 = layer.get_base_layer().weight.detach().clone()
    pm.merge_adapter(["a"])
    with pytest.raises(ValueError, match="one adapter per layer.*already merged"):
        pm.merge_adapter(["b"])
    pm.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, w0)


def test_l4q_trainer_callback_freezes_then_trains_scales_and_logs(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tokens(Dataset):
        def __init__(self):
            self.ids = inputs(batch=8, seq=16)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    pm = get_peft_model(llama_gqa(), L4QConfig(r=4, bits=4, group_size=32))
    steps = lambda: torch.cat([p.detach().flatten().clone() for n, p in pm.named_parameters() if "l4q_step" in n])  # noqa: E731
    a_params = lambda: torch.cat([p.detach().flatten().clone() for n, p in pm.named_parameters() if "l4q_A" in n])  # noqa: E731
    step0, a0 = steps(), a_params()
    cb = hfcompress.L4QCallback(freeze_scales_steps=2, per_layer=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=pm, args=args, train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    assert torch.equal(steps(), step0)  # frozen during the warm-up
    assert not torch.equal(a_params(), a0)  # ... while LoRA trained
    args.max_steps = 4
    trainer.train(resume_from_checkpoint=None)
    assert not torch.equal(steps(), step0)  # trainable after it
    logged = [h for h in trainer.state.log_history if "l4q/clip_fraction" in h]
    assert logged and all(0.0 <= h["l4q/clip_fraction"] < 1.0 and h["l4q/mean_step"] > 0 for h in logged)
    assert any(k.endswith("q_proj/mean_step") for k in logged[-1])
    assert cb.history and cb.history[-1]["l4q/mean_step"] == logged[-1]["l4q/mean_step"]


def test_l4q_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="bits=5"):
        L4QConfig(bits=5)
    with pytest.raises(ConfigError, match="init_scales"):
        L4QConfig(init_scales="absmax")
    with pytest.raises(ConfigError, match="L4QConfig.r"):
        L4QConfig(r=0)
    with pytest.raises(ValueError, match=r"q_proj.*group_size=128 is larger than in_features=96"):
        get_peft_model(llama_gqa(), L4QConfig(group_size=128))
    with pytest.raises(TypeError, match=r"c_attn.*nn.Linear"):
        get_peft_model(gpt2(), L4QConfig(group_size=32))
    with pytest.raises(ValueError, match="no L4Q layers"):
        hfcompress.l4q.export(llama_gqa(), "/nonexistent")
    llama_gqa().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="L4Q is trained"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hfcompress.l4q.L4QQuantConfig(group_size=32))


def test_l4q_scales_are_stored_exactly():
    spec, x, w0, a, b, step, zero, bias = _layer_case(4, False)
    s = stored_step(step)
    assert torch.equal(s, s.half().float()) and not torch.equal(s, step.detach())
    assert default_g_idx(spec, 40).tolist()[-8:] == [2] * 8  # ragged last group of 8 in this case


def test_l4q_example_trainer_script(tmp_path):
    """examples/l4q_trainer.py end to end on its tiny model: Trainer + callback + export + reload."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "l4q_trainer.py")
    spec = importlib.util.spec_from_file_location("l4q_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--out", str(tmp_path / "out"), "--steps", "4"]) is True
    assert (tmp_path / "out" / "config.json").exists()


def test_l4q_disable_and_unload_give_the_float_model():
    ids = inputs()
    base = llama_gqa()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    pm, _ = _train(get_peft_model(base, L4QConfig(r=4, bits=3, group_size=32)), ids, steps=2)
    with torch.no_grad():
        assert not torch.equal(pm(input_ids=ids).logits, ref)
        with pm.disable_adapter():
            assert torch.equal(pm(input_ids=ids).logits, ref)
        plain = pm.unload()
        assert not any(isinstance(m, QuantLinear) or "l4q" in n for n, m in plain.named_modules())
        assert torch.equal(plain(input_ids=ids).logits, ref)


PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.usefixtures("exact_cpu_reference")  # step 0 must equal the quantized model bit for bit (fp32 fake-quant)
def test_l4q_on_quantized_base_starts_from_its_grid(tmp_path):
    """L4Q on an hfcompress-quantized model (here RTN; GPTQ without act-order alike) starts from the
    stored grid: at step 0 it computes exactly the quantized model; then trains and exports."""
    ids = inputs()
    qmodel = quantize_(llama_gqa(), RTNConfig(bits=3, group_size=32, mse_clip=True, zero_point="int"))
    with torch.no_grad():
        q_logits = qmodel(input_ids=ids).logits
    pm = get_peft_model(qmodel, L4QConfig(r=4, bits=3, group_size=32, target_modules=PROJ))
    assert len(hfcompress.l4q.l4q_layers(pm)) == 14
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, q_logits)
    pm, losses = _train(pm, ids, steps=4)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained = pm(input_ids=ids).logits
    assert not torch.equal(trained, q_logits)
    hfcompress.l4q.export(pm, tmp_path / "q")
    with torch.no_grad(), _reference_op():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(input_ids=ids).logits, trained)
    with pytest.raises(ValueError, match="merge_and_unload"):
        pm.merge_adapter()


def test_l4q_on_act_order_base_is_refused():
    from hfcompress import GPTQConfig

    qmodel = quantize_(llama_gqa(), GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False,
                                               zero_point="int", n_samples=2, seq_len=16),
                       batches=[inputs(batch=2, seq=16)])
    with pytest.raises(ValueError, match="act-order g_idx"):
        get_peft_model(qmodel, L4QConfig(r=4, bits=4, group_size=32, target_modules=PROJ))


def test_l4q_on_float_zero_base_is_refused():
    """GPTQ's default grid (static groups, float zeros): no g_idx, but zeros L4Q cannot learn as integers."""
    from hfcompress import GPTQConfig

    qmodel = quantize_(llama_gqa(), GPTQConfig(bits=4, group_size=32, n_samples=2, seq_len=16),
                       batches=[inputs(batch=2, seq=16)])
    assert qmodel.model.layers[0].self_attn.q_proj.weight_g_idx is None
    with pytest.raises(ValueError, match=r"float zero points \(zero_point='float'.*zero_point='int'"):
        get_peft_model(qmodel, L4QConfig(r=4, bits=4, group_size=32, target_modules=PROJ))


def test_l4q_init_weights_is_the_peft_name_init_lora_weights_an_alias(tmp_path):
    """PEFT's non-LoRA methods call the init switch ``init_weights`` (its tests set it); adapter configs
    written before carry ``init_lora_weights`` and still load with its value."""
    assert L4QConfig(init_weights=False).init_weights is False
    old = L4QConfig(init_lora_weights=False)
    assert old.init_weights is False and old.init_lora_weights is None
    pm = get_peft_model(llama_gqa(), L4QConfig(r=4, bits=4, group_size=32, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["init_weights"]
    cfg["init_lora_weights"] = False
    cfg_path.write_text(json.dumps(cfg))
    loaded = PeftModel.from_pretrained(llama_gqa(), tmp_path)
    assert loaded.peft_config["default"].init_weights is False

"""PEFT conformance: every PEFT method of ours follows the conventions PEFT checks for its built-in
methods (its tests/testing_common.py and tests/test_custom_models.py), on PEFT's kind of tiny MLP
and on the tiny Llama / Qwen2 / GPT-2 / BERT models of tests/tiny_models.py:

* adapter dtype: fp32 with ``autocast_adapter_dtype=True`` (PEFT's default), the base model's dtype
  with False, for get_peft_model, add_adapter, PeftModel.from_pretrained and load_adapter, with and
  without ``low_cpu_mem_usage``;
* requires_grad after loading (``is_trainable`` False / True, ``set_requires_grad``), shared state included;
* ``in_features`` / ``out_features`` on every tuner layer;
* every trainable parameter moves in a few SGD steps from the default initialisation (no dead factor);
* disable_adapter / merge / unmerge / merge_and_unload consistent (or merging refused with a clear error);
* several adapters: add, switch, several active at once (or refused), delete;
* save / load with and without ``low_cpu_mem_usage``: identical outputs, nothing left on meta.

A new method inherits the whole battery by adding one row to ``METHODS``. ``pytest -k <method id>``
selects everything about one method. PEFT's own battery itself runs in benchmarks/peft_battery.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import hfcompress  # noqa: F401  (registers the methods with PEFT)
from hfcompress.adapters.compacter import CompacterConfig
from hfcompress.adapters.l4q import L4QConfig
from hfcompress.adapters.mos import MoSConfig
from tiny_models import BUILDERS, inputs


class PeftMLP(nn.Module):
    """PEFT's "MLP" test model (tests/test_custom_models.py): two linears, 10 -> 20 -> 2."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.relu(self.lin0(X))))


def peft_mlp(seed: int = 0):
    torch.manual_seed(seed)
    return PeftMLP().eval()


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": peft_mlp, **BUILDERS}

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Method:
    """One row: how to configure the method on each model, and what it refuses (with which error)."""

    id: str
    config: Callable[..., object]  # (model name, **overrides) -> PeftConfig with the default init
    prefix: str
    models: tuple[str, ...]
    merge_error: Optional[str] = None  # merging refused with this error (regex); None = merges exactly
    identity_at_init: bool = True  # the default init computes exactly the base model
    multi_active_error: Optional[str] = None  # several adapters active on one layer refused with this error
    non_identity: dict = field(default_factory=lambda: {"init_weights": False})
    # before the training check: puts the model where every parameter has a gradient by the method's own
    # definition (None: the default init already does)
    prepare_training: Optional[Callable[[nn.Module], None]] = None


@torch.no_grad()
def l4q_clip_some_weights(peft_model):
    """L4Q's learned offset gets gradient only from weights its grid clips (LSQ+: inside the range the
    offset cancels); the default min-max grid clips none, so halve the steps to make some clip."""
    for name, p in peft_model.named_parameters():
        if ".l4q_step." in name:
            p.mul_(0.5)


def compacter(placement):
    def make(model, **kw):
        targets = ["lin0", "lin1"] if model == "mlp" else None  # None: the placement's default modules
        return CompacterConfig(placement=placement, n=2 if model == "mlp" else 4, reduction_factor=4,
                               target_modules=targets, **kw)
    return make


MOS_TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
               "qwen2": ["q_proj", "v_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"],
               "bert": ["query", "value", "dense"]}
L4Q_TARGETS = {"mlp": ["lin0", "lin1"], "llama": LLAMA_PROJ, "qwen2": LLAMA_PROJ, "bert": ["query", "value", "dense"]}

METHODS = [
    Method("compacter", compacter("houlsby"), "compacter_", tuple(MODELS),
           merge_error="cannot be merged into the base weights"),
    Method("compacter++", compacter("pfeiffer"), "compacter_", tuple(MODELS),
           merge_error="cannot be merged into the base weights"),
    Method("mos", lambda model, **kw: MoSConfig(r=4, target_modules=MOS_TARGETS[model], **kw), "mos_",
           tuple(MODELS)),
    # L4Q: nn.Linear targets only (GPT-2's Conv1D is refused, see test_l4q); its "base" is the float model:
    # the default init computes the quantized model, so it is not the identity
    Method("l4q", lambda model, **kw: L4QConfig(r=4, bits=4, group_size=-1 if model == "mlp" else 32,
                                                target_modules=L4Q_TARGETS[model], **kw), "l4q_",
           ("mlp", "llama", "qwen2", "bert"), identity_at_init=False,
           multi_active_error="L4Q quantizes one merged weight per layer", prepare_training=l4q_clip_some_weights),
]
CASES = [pytest.param(m, model, id=f"{m.id}-{model}") for m in METHODS for model in m.models]
ROWS = [pytest.param(m, id=m.id) for m in METHODS]


def run(model, name: str) -> torch.Tensor:
    """The model's output (log-probabilities for the MLP, logits for the tiny LMs), no grad."""
    with torch.no_grad():
        return forward(model, name)


def forward(model, name: str) -> torch.Tensor:
    if name == "mlp":
        return model(X=torch.arange(90, dtype=torch.float32).view(9, 10) / 10)
    return model(input_ids=inputs()).logits


def loss_of(model, name: str) -> torch.Tensor:
    """PEFT's training check loss: the sum of the outputs."""
    if name == "mlp":
        return forward(model, name).sum()
    return model(input_ids=inputs(batch=4, seq=24, seed=6)).logits.sum()


def adapter_params(model, prefix: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if prefix in n}


def non_identity(m: Method, model: str, **kw):
    """A config whose adapter visibly changes the output (save/load and switching cannot pass trivially)."""
    return m.config(model, **m.non_identity, **kw)


# --- dtype autocast x load paths --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,model", CASES)
def test_peft_conformance_adapter_dtype(m, model, dtype, tmp_path):
    """fp32 adapters with autocast_adapter_dtype=True, the base dtype with False: get_peft_model,
    add_adapter, from_pretrained, load_adapter, with and without low_cpu_mem_usage."""
    for autocast in (True, False):
        want = torch.float32 if autocast else dtype
        peft_model = get_peft_model(MODELS[model]().to(dtype), m.config(model), autocast_adapter_dtype=autocast)
        peft_model.add_adapter("other", m.config(model), autocast_adapter_dtype=autocast)
        params = adapter_params(peft_model, m.prefix)
        assert params and {n for n, p in params.items() if p.dtype != want} == set(), (autocast, "get/add")
        assert any(".other" in n for n in params) and any(".default" in n for n in params)
        assert all(p.dtype == dtype for n, p in peft_model.named_parameters() if m.prefix not in n)
        saved = {k: v.clone() for k, v in peft_model.state_dict().items() if m.prefix in k}
        out = tmp_path / f"autocast{autocast}"
        peft_model.save_pretrained(out)
        for low_cpu_mem_usage in (False, True):
            loaded = PeftModel.from_pretrained(MODELS[model]().to(dtype), out, autocast_adapter_dtype=autocast,
                                               low_cpu_mem_usage=low_cpu_mem_usage)
            loaded.load_adapter(out / "other", adapter_name="other", autocast_adapter_dtype=autocast,
                                low_cpu_mem_usage=low_cpu_mem_usage)
            where = (autocast, "low_cpu_mem_usage" if low_cpu_mem_usage else "load")
            params = adapter_params(loaded, m.prefix)
            assert {n for n, p in params.items() if p.dtype != want} == set(), where
            assert not [n for n, t in loaded.state_dict().items() if t.device.type == "meta"], where
            state = loaded.state_dict()
            assert saved.keys() <= state.keys(), where
            for k, v in saved.items():
                assert torch.equal(state[k].to(v.dtype), v), (where, k)


# --- requires_grad after loading ---------------------------------------------------------------


@pytest.mark.parametrize("m,model", CASES)
def test_peft_conformance_requires_grad_on_load(m, model, tmp_path):
    peft_model = get_peft_model(MODELS[model](), m.config(model))
    n_trainable, _ = peft_model.get_nb_trainable_parameters()
    peft_model.save_pretrained(tmp_path)

    def trainable(pm):
        return {n for n, p in pm.named_parameters() if p.requires_grad}

    frozen = PeftModel.from_pretrained(MODELS[model](), tmp_path)  # is_trainable=False (PEFT's default)
    assert trainable(frozen) == set()
    frozen.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    names = trainable(frozen)
    assert names and all(".other" in n and m.prefix in n for n in names)
    assert sum(p.numel() for n, p in frozen.named_parameters() if n in names) == n_trainable

    live = PeftModel.from_pretrained(MODELS[model](), tmp_path, is_trainable=True)
    names = trainable(live)
    assert names and all(".default" in n and m.prefix in n for n in names)
    assert sum(p.numel() for n, p in live.named_parameters() if n in names) == n_trainable  # shared state included
    live.load_adapter(tmp_path, adapter_name="frozen", is_trainable=False)
    assert trainable(live) == names  # loading another adapter leaves this one's flags alone
    live.set_requires_grad("default", requires_grad=False)
    assert trainable(live) == set()
    live.set_requires_grad(["default", "frozen"], requires_grad=True)
    assert {n for n in trainable(live)} == set(adapter_params(live, m.prefix))


# --- tuner-layer attributes --------------------------------------------------------------------


@pytest.mark.parametrize("m,model", CASES)
def test_peft_conformance_in_out_features(m, model):
    peft_model = get_peft_model(MODELS[model](), m.config(model))
    layers = [mod for mod in peft_model.modules() if isinstance(mod, BaseTunerLayer)]
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        if type(base).__name__ == "Conv1D":  # GPT-2: weight [in, out]
            want = tuple(base.weight.shape)
        else:
            want = (base.in_features, base.out_features)
        assert (layer.in_features, layer.out_features) == want, type(base).__name__


# --- no dead parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("m,model", CASES)
def test_peft_conformance_every_parameter_trains(m, model):
    """PEFT's check (test_only_params_are_updated): a few SGD steps from the default init move every
    trainable parameter (beyond atol = rtol = 1e-4) and nothing else."""
    peft_model = get_peft_model(MODELS[model](), m.config(model))
    if m.prepare_training is not None:
        m.prepare_training(peft_model)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    peft_model.train()
    opt = torch.optim.SGD(peft_model.parameters(), lr=0.5)
    for _ in range(3 if model == "mlp" else 5):  # PEFT: 3 steps on its MLP
        opt.zero_grad()
        loss_of(peft_model, model).backward()
        opt.step()
    stuck, moved = [], []
    for n, p in peft_model.named_parameters():
        assert torch.isfinite(p).all(), n
        if p.requires_grad:
            if torch.allclose(p, before[n], atol=1e-4, rtol=1e-4):
                stuck.append(n)
        elif not torch.equal(p, before[n]):
            moved.append(n)
    assert not stuck, f"trainable but stuck after SGD steps: {stuck}"
    assert not moved, f"frozen but changed: {moved}"
    assert set(adapter_params(peft_model, m.prefix)) == {n for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("m", ROWS)
def test_peft_conformance_trained_params_survive_reload(m, seed, tmp_path):
    """PEFT's test_parameters_after_loading_model: adapters on both linears of its MLP, three SGD steps at
    lr 0.5 on its unnormalised inputs (0..89), then save and reload: the parameters stay finite and reload
    equal. (Compacter with S_i ~ N(0, 1/n) overflowed here: tests/test_compacter.py.)"""
    peft_model = get_peft_model(peft_mlp(seed), m.config("mlp"))  # the default init, as PEFT's check
    peft_model.train()
    opt = torch.optim.SGD(peft_model.parameters(), lr=0.5)
    x = torch.arange(90, dtype=torch.float32).view(9, 10)
    for _ in range(3):
        opt.zero_grad()
        peft_model(X=x).sum().backward()
        opt.step()
    trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if m.prefix in n}
    assert trained and not [n for n, p in trained.items() if not torch.isfinite(p).all()]
    peft_model.save_pretrained(tmp_path)
    loaded = dict(PeftModel.from_pretrained(peft_mlp(seed), tmp_path).named_parameters())
    for n, p in trained.items():
        assert torch.allclose(loaded[n], p, atol=1e-4, rtol=1e-4), n


# --- disable / merge / unmerge -----------------------------------------------------------------


@pytest.mark.usefixtures("exact_cpu_reference")  # L4Q's merge_and_unload gives QuantLinears: compare at fp32
@pytest.mark.parametrize("m,model", CASES)
def test_peft_conformance_disable_merge_unmerge(m, model):
    base_out = run(MODELS[model](), model)
    fresh = get_peft_model(MODELS[model](), m.config(model))
    assert torch.equal(run(fresh, model), base_out) == m.identity_at_init

    peft_model = get_peft_model(MODELS[model](), non_identity(m, model))
    y = run(peft_model, model)
    assert (y - base_out).abs().max() > 1e-4
    with peft_model.disable_adapter():
        assert torch.equal(run(peft_model, model), base_out)  # the base model, exactly
    assert torch.equal(run(peft_model, model), y)

    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if m.prefix not in n}
    if m.merge_error:
        with pytest.raises(ValueError, match=m.merge_error):
            peft_model.merge_adapter()
        assert all(torch.equal(p, weights[n]) for n, p in peft_model.named_parameters() if n in weights)
        assert torch.equal(run(peft_model, model), y)
        with pytest.raises(ValueError, match=m.merge_error):
            peft_model.merge_and_unload()
        plain = peft_model.unload()
        assert torch.equal(run(plain, model), base_out)
        return
    peft_model.merge_adapter()
    assert torch.allclose(run(peft_model, model), y, atol=1e-5, rtol=1e-4)
    with peft_model.disable_adapter():  # disabling a merged adapter gives the base model (PEFT unmerges)
        assert torch.allclose(run(peft_model, model), base_out, atol=1e-6, rtol=0)
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    for n, p in peft_model.named_parameters():
        if n in weights:
            assert torch.allclose(p, weights[n], atol=1e-6, rtol=0), n
    assert torch.allclose(run(peft_model, model), y, atol=1e-6, rtol=0)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(mod, BaseTunerLayer) for mod in merged.modules())
    assert torch.allclose(run(merged, model), y, atol=1e-5, rtol=1e-4)


# --- several adapters --------------------------------------------------------------------------


@pytest.mark.parametrize("m,model", CASES)
def test_peft_conformance_multiple_adapters(m, model):
    def seeded(seed):
        base = MODELS[model]()  # (the builders seed torch themselves)
        torch.manual_seed(seed)
        return base

    ya = run(get_peft_model(seeded(1), non_identity(m, model)), model)
    yb = run(get_peft_model(seeded(2), non_identity(m, model)), model)
    assert not torch.equal(ya, yb)

    peft_model = get_peft_model(seeded(1), non_identity(m, model), adapter_name="a")
    torch.manual_seed(2)
    peft_model.add_adapter("b", non_identity(m, model))
    assert torch.equal(run(peft_model, model), ya)  # adding leaves "a" active
    peft_model.set_adapter("b")
    assert torch.equal(run(peft_model, model), yb)
    peft_model.set_adapter("a")
    assert torch.equal(run(peft_model, model), ya)

    layers = [mod for mod in peft_model.modules() if isinstance(mod, BaseTunerLayer)]
    for layer in layers:
        layer.set_adapter(["a", "b"])
    if m.multi_active_error:
        with pytest.raises(ValueError, match=m.multi_active_error):
            run(peft_model, model)
    else:
        both = run(peft_model, model)
        assert not torch.allclose(both, ya, atol=1e-5) and not torch.allclose(both, yb, atol=1e-5)
    peft_model.base_model.set_adapter("b")
    peft_model.delete_adapter("a")
    assert list(peft_model.peft_config) == ["b"]
    assert not [k for k in peft_model.state_dict() if ".a." in k or k.endswith(".a")]
    assert torch.equal(run(peft_model, model), yb)


# --- save / load with low_cpu_mem_usage ------------------------------------------------------------


@pytest.mark.parametrize("m,model", CASES)
def test_peft_conformance_save_load_low_cpu_mem_usage(m, model, tmp_path):
    peft_model = get_peft_model(MODELS[model](), non_identity(m, model))
    y = run(peft_model, model)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    peft_model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(MODELS[model](), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert torch.equal(run(loaded, model), y), low_cpu_mem_usage
        got = loaded.state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], v) for k, v in state.items())
        assert not [k for k, t in got.items() if t.device.type == "meta"]
        loaded.load_adapter(tmp_path, adapter_name="again", low_cpu_mem_usage=low_cpu_mem_usage)
        loaded.set_adapter("again")
        assert torch.equal(run(loaded, model), y), low_cpu_mem_usage


# --- the checks themselves, on PEFT's LoRA (a built-in method passes them) --------------------------


LORA = Method("lora", lambda model, **kw: LoraConfig(r=4, target_modules=MOS_TARGETS[model], **kw), "lora_",
              ("mlp", "llama"), non_identity={"init_lora_weights": False})


@pytest.mark.parametrize("model", LORA.models)
def test_peft_conformance_checks_hold_for_peft_lora(model, tmp_path):
    """The battery's checks are PEFT's conventions: PEFT's own LoRA passes them unchanged."""
    test_peft_conformance_every_parameter_trains(LORA, model)
    test_peft_conformance_disable_merge_unmerge(LORA, model)
    test_peft_conformance_requires_grad_on_load(LORA, model, tmp_path / "grad")
    test_peft_conformance_adapter_dtype(LORA, model, torch.bfloat16, tmp_path / "dtype")

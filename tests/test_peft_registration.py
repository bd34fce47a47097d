"""register_peft_method_type: the one function that makes a third-party method a PEFT method.

These tests fail loudly when peft changes an internal the registration relies on (the
PeftType enum maps, the PEFT_TYPE_TO_* mappings, register_peft_method's signature). A tiny
test-only method (a learned per-output bias, "hfcregtest") exercises the whole path:
get_peft_model -> save_pretrained -> PeftModel.from_pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn

import hfcompress  # noqa: F401  (registers hfcompress's methods)
from hfcompress.integrations.peft import check_peft_internals, register_peft_method_type
from tiny_models import inputs, llama_gqa

NAME = "hfcregtest"


@dataclass
class RegTestConfig(PeftConfig):
    target_modules: object = None
    exclude_modules: object = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(NAME.upper())


class RegTestLayer(BaseTunerLayer):
    adapter_layer_names = ("hfcregtest_bias",)

    def __init__(self, base_layer):
        self.base_layer = base_layer
        self.hfcregtest_bias = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name, config):
        g = torch.Generator().manual_seed(len(self.hfcregtest_bias) + 7)
        out = self.get_base_layer().out_features
        self.hfcregtest_bias[adapter_name] = nn.Parameter(torch.randn(out, generator=g) * 0.1)
        self.set_adapter(self.active_adapters)


class RegTestLinear(nn.Module, RegTestLayer):
    def __init__(self, base_layer, adapter_name, config):
        super().__init__()
        RegTestLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x):
        y = self.base_layer(x)
        if self.disable_adapters:
            return y
        for a in self.active_adapters:
            if a in self.hfcregtest_bias:
                y = y + self.hfcregtest_bias[a]
        return y


class RegTestModel(BaseTuner):
    prefix = "hfcregtest_"
    tuner_layer_cls = RegTestLayer
    target_module_mapping = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key):
        if isinstance(target, RegTestLayer):
            target.update_layer(adapter_name, config)
            return
        self._replace_module(parent, target_name, RegTestLinear(target, adapter_name, config), target)


@pytest.fixture(scope="module")
def registered():
    return register_peft_method_type(NAME, RegTestConfig, RegTestModel, prefix="hfcregtest_")


def test_peft_registration_internals_present():
    check_peft_internals()  # raises PeftInternalsError naming what moved


def test_peft_registration_extends_enum_and_mappings(registered):
    member = registered
    assert member is PeftType.HFCREGTEST is PeftType("HFCREGTEST") is PeftType["HFCREGTEST"]
    assert member == "HFCREGTEST" and isinstance(member, str)
    assert member in list(PeftType)
    # adapter_config.json stores the raw string; loading looks it up by that string
    assert PEFT_TYPE_TO_CONFIG_MAPPING["HFCREGTEST"] is RegTestConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is RegTestModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "hfcregtest_"
    # built-ins untouched
    assert PeftType("LORA") is PeftType.LORA and PeftType.LORA in PEFT_TYPE_TO_CONFIG_MAPPING


def test_peft_registration_idempotent_and_guarded(registered):
    n = len(list(PeftType))
    assert register_peft_method_type(NAME, RegTestConfig, RegTestModel, prefix="hfcregtest_") is registered
    assert len(list(PeftType)) == n

    class Other(RegTestConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_peft_method_type(NAME, Other, RegTestModel, prefix="hfcregtest_")
    with pytest.raises(ValueError, match="already registered"):
        register_peft_method_type("lora", RegTestConfig, RegTestModel, prefix="hfcregtest_")
    with pytest.raises(ValueError, match="prefix"):
        register_peft_method_type("hfcregtest2", RegTestConfig, RegTestModel, prefix="other_")
    with pytest.raises(ValueError, match="lower-case"):
        register_peft_method_type("BadName", RegTestConfig, RegTestModel, prefix="hfcregtest_")
    assert "HFCREGTEST2" not in PeftType._member_map_


def test_peft_registration_hfcompress_methods_registered():
    from hfcompress.adapters import PEFT_METHODS

    for name, (config_cls, model_cls, prefix) in PEFT_METHODS.items():
        assert PEFT_TYPE_TO_CONFIG_MAPPING[name.upper()] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[name.upper()] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType(name.upper())] == prefix == model_cls.prefix


def test_peft_registration_roundtrip(registered, tmp_path):
    model = get_peft_model(llama_gqa(), RegTestConfig(target_modules=["o_proj"]))
    x = inputs()
    with torch.no_grad():
        ref = model(x).logits
        with model.disable_adapter():
            base = model(x).logits
    assert not torch.equal(ref, base)  # non-zero init: the adapter changes the output
    model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).peft_type == "HFCREGTEST"
    loaded = PeftModel.from_pretrained(llama_gqa(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_peft_registration_version_guard(monkeypatch):
    import peft
    from peft import mapping

    from hfcompress.integrations.peft import PeftInternalsError

    monkeypatch.setattr(peft, "__version__", "0.99.0")
    with pytest.warns(UserWarning, match="peft 0.99.0"):
        check_peft_internals()
    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_PREFIX_MAPPING")
    with pytest.raises(PeftInternalsError, match="PEFT_TYPE_TO_PREFIX_MAPPING"):
        check_peft_internals()

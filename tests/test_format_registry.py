"""The format registry: lookup, the per-layer tensor list, validation with per-layer sizes, and
which files a format may own (a new format is its folder + its algorithm file + one
registration line; nothing else in the package may name its classes, tensors or name)."""

from __future__ import annotations

import io
import pathlib
import tokenize

import pytest
import torch

import hfcompress
from hfcompress.formats import (
    CompressedLinear,
    FormatError,
    TensorSpec,
    expected_tensors,
    formats,
    get_format,
    is_compressed,
    make_layer,
    register_format,
    validate_tensors,
)
from hfcompress.formats.int_group import IntGroupSpec
from hfcompress.formats.registry import Format, bind_sizes, stored_bits

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("src", "integrations")

#: int_group predates the registry: besides its folder, the algorithms that emit it (RTN, GPTQ,
#: L4Q and their drivers/configs, the distributed GPTQ row split), the kernels that compute it,
#: and the names kept importable for older code (hfcompress.nn, hfcompress.ops, the package root) may name it.
INT_GROUP_USERS = {
    "src/hfcompress/__init__.py", "src/hfcompress/config.py", "src/hfcompress/calibration/apply.py",
    "src/hfcompress/distributed/solve.py",  # GPTQ split by rows over ranks: the rows travel as int_group tensors
    "src/hfcompress/algorithms/rtn.py", "src/hfcompress/algorithms/gptq.py", "src/hfcompress/algorithms/grid.py",
    "src/hfcompress/algorithms/l4q.py", "src/hfcompress/adapters/l4q/config.py", "src/hfcompress/adapters/l4q/layer.py",
    "src/hfcompress/adapters/l4q/model.py", "src/hfcompress/nn/__init__.py", "src/hfcompress/nn/quant_linear.py",
    "src/hfcompress/ops/__init__.py", "src/hfcompress/ops/backends.py", "src/hfcompress/ops/int_group_mm.py",
}


def owned_files(name: str) -> set[str] | None:
    """Files outside ``formats/<name>/`` allowed to name format ``name`` (``None``: any under a prefix)."""
    allowed = {"src/hfcompress/formats/__init__.py", f"src/hfcompress/algorithms/{name}.py"}
    if name == "int_group":
        allowed |= INT_GROUP_USERS
    return allowed


def _identifiers(fmt: Format) -> set[str]:
    """The format's name, classes and the tensor names no other format shares."""
    names = {fmt.name, fmt.layer_cls.__name__, fmt.spec_cls.__name__}
    shared = {t for other in formats().values() if other is not fmt for t in other.spec_cls.all_tensor_names()}
    names |= {t for t in fmt.spec_cls.all_tensor_names() if t != "weight" and t not in shared}
    return names


def _named(path: pathlib.Path, ids: set[str]) -> set[str]:
    """Identifiers of ``ids`` used as code names or exact string constants (docstrings don't count)."""
    hits = set()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NAME and tok.string in ids:
            hits.add(tok.string)
        elif tok.type == tokenize.STRING and tok.string.strip("\"'") in ids:
            hits.add(tok.string.strip("\"'"))
    return hits


@pytest.mark.parametrize("name", sorted(formats()))
def test_a_format_is_named_only_in_the_files_it_owns(name):
    fmt = formats()[name]
    ids = _identifiers(fmt)
    allowed = owned_files(name)
    folder = f"src/hfcompress/formats/{name}/"
    offenders = {}
    for d in PACKAGE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(folder) or rel in allowed:
                continue
            if name == "int_group" and rel.startswith(("src/hfcompress/kernels/", "src/hfcompress/formats/")):
                continue  # the int_group Triton / CPU kernels; other formats may build on its grid
            if rel.startswith("src/hfcompress/convert/") and name in path.stem:
                continue  # converters to/from a format's foreign layouts
            hits = _named(path, ids)
            if hits:
                offenders[rel] = sorted(hits)
    assert not offenders, f"files outside the {name} format's own files name it: {offenders}"


@pytest.mark.parametrize("name", sorted(formats()))
def test_a_format_is_registered_by_one_line(name):
    text = (ROOT / "src/hfcompress/formats/__init__.py").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("from . import") and name in ln.split()]
    assert len(lines) == 1, f"formats/__init__.py should register {name} with one `from . import {name}` line"
    fmt = formats()[name]
    assert fmt.layer_cls.__module__.startswith(f"hfcompress.formats.{name}.")
    assert fmt.spec_cls.__module__.startswith(f"hfcompress.formats.{name}.")
    assert issubclass(fmt.layer_cls, CompressedLinear)


def test_lookup_by_name_and_by_spec_and_unknown_names_the_known():
    spec = IntGroupSpec(bits=3, group_size=32)
    assert get_format("int_group") is get_format(spec)
    with pytest.raises(FormatError, match=r"format='nope' is unknown; known formats: \[.*'int_group'"):
        get_format("nope")
    with pytest.raises(hfcompress.ConfigError, match="quantization_config.format='nope' is unknown"):
        hfcompress.RTNConfig(format="nope")


def test_registering_a_different_format_under_a_taken_name_is_refused():
    fmt = get_format("int_group")
    assert register_format(fmt) is fmt  # idempotent
    other = Format(name="int_group", version=9, spec_cls=IntGroupSpec, layer_cls=fmt.layer_cls, spec_fields=())
    with pytest.raises(ValueError, match="already registered"):
        register_format(other)
    assert get_format("int_group") is fmt


@pytest.mark.parametrize("sym,act", [(False, False), (True, True)])
def test_expected_tensors_per_layer_match_what_a_layer_stores(sym, act):
    spec = IntGroupSpec(bits=3, group_size=32, sym=sym, act_order=act)
    expected = expected_tensors(spec, 70, 96)
    assert expected["weight"] == TensorSpec((70, 9), torch.int32)
    assert expected["weight_scale"] == TensorSpec((70, 3), torch.float16)
    assert ("weight_zero" in expected) == (not sym) and ("weight_g_idx" in expected) == act
    layer = make_layer(spec, 96, 70, bias=True, compute_dtype=torch.bfloat16)
    assert is_compressed(layer) and not is_compressed(torch.nn.Linear(2, 2))
    stored = layer.stored_tensors()
    assert list(stored) == list(expected)
    for name, ts in expected.items():
        assert (tuple(stored[name].shape), stored[name].dtype) == (ts.shape, ts.dtype)
    assert layer.bias.dtype == torch.bfloat16 and "bias" not in stored
    assert stored_bits(spec, 70, 96) == sum(t.numel() * t.element_size() * 8 for t in stored.values())


class _SparseSpec(IntGroupSpec):
    """A test-only spec with a per-layer size (``nnz``) shared by two tensors."""

    def tensors(self, out_features, in_features):
        out = super().tensors(out_features, in_features)
        out["weight_outlier_values"] = TensorSpec(("nnz",), torch.float16)
        out["weight_outlier_cols"] = TensorSpec(("nnz",), torch.int32)
        return out


def test_per_layer_sizes_bind_across_tensors_and_mismatch_names_the_tensor():
    spec = _SparseSpec(bits=4, group_size=32, sym=True)
    base = {n: torch.zeros(ts.shape, dtype=ts.dtype) for n, ts in IntGroupSpec(bits=4, group_size=32, sym=True)
            .tensors(8, 64).items()}
    ok = dict(base, weight_outlier_values=torch.zeros(5, dtype=torch.float16),
              weight_outlier_cols=torch.zeros(5, dtype=torch.int32))
    assert bind_sizes(ok, spec, 8, 64, "m") == {"nnz": 5}
    assert validate_tensors(ok, spec, 8, 64, "m") == {"nnz": 5}
    bad = dict(ok, weight_outlier_cols=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(FormatError, match=r"m\.weight_outlier_cols has nnz=4, but another tensor of the layer has nnz=5"):
        validate_tensors(bad, spec, 8, 64, "m")
    missing = {k: v for k, v in ok.items() if k != "weight_outlier_values"}
    with pytest.raises(FormatError, match=r"m\.weight_outlier_values is missing"):
        validate_tensors(missing, spec, 8, 64, "m")
    assert stored_bits(spec, 8, 64, {"nnz": 5}) == stored_bits(IntGroupSpec(bits=4, group_size=32, sym=True), 8, 64) \
        + 5 * (16 + 32)


def test_config_resolves_a_spec_per_module():
    config = hfcompress.GPTQConfig(bits=3, group_size=32, act_order=False)
    assert config.spec_for("model.layers.0.self_attn.q_proj") == config.spec == IntGroupSpec(bits=3, group_size=32,
                                                                                             zero_point="float")


def test_plugin_config_classes_are_reachable_from_the_package():
    assert hfcompress.RTNConfig is hfcompress.config.RTNConfig
    with pytest.raises(AttributeError, match="NoSuchConfig"):
        hfcompress.NoSuchConfig  # noqa: B018


def test_device_backends_are_torch_library_kernels_that_may_decline():
    from hfcompress.formats.int_group.op import BACKENDS, int_group_mm_ref

    spec = IntGroupSpec(bits=4, group_size=32, sym=True)
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 64))
    layer = hfcompress.QuantLinear.from_codes(codes, torch.rand(8, 2) + 0.1, None, None, spec)
    x = torch.randn(3, 64)
    saved = BACKENDS.impls.get("cpu")
    calls = []
    try:
        BACKENDS.register("cpu", lambda *a: calls.append("declined"))  # returns None: reference runs
        ref = int_group_mm_ref(x, layer.weight, layer.weight_scale, None, None, None, 4, 32, True, 64)
        assert torch.equal(layer(x), ref) and calls == ["declined"]
        BACKENDS.register("cpu", lambda *a: torch.full((3, 8), 7.0))
        assert torch.equal(layer(x), torch.full((3, 8), 7.0))
        BACKENDS.register("cpu", None)
        assert torch.equal(layer(x), ref)
    finally:
        BACKENDS.register("cpu", saved)

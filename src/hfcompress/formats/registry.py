"""The format registry: every storage format is found here by name, and everything outside a
format's folder (the transformers quantizer, reload validation, calibration, streaming, PEFT
dispatch, EoRA, Hub statistics, ``inspect``, the CLI) asks the registry instead of naming a
format's classes or tensors.

A format registers one :class:`Format`: its name and ``format_version``, its spec class (the
fields config.json stores), and its layer class (a :class:`~hfcompress.formats.layer.CompressedLinear`).
The spec is the single source of the tensors a layer stores: ``spec.tensors(out, in)`` gives
``{name: TensorSpec(shape, dtype)}`` relative to the module (bias excluded). A shape entry may
be a string, a size bound per layer by the stored tensors themselves (e.g. ``"nnz"``, the
number of sparse outliers): :func:`validate_tensors` binds it consistently across tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch


class FormatError(ValueError):
    """A format spec or a stored tensor that does not follow its format's contract."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape (ints, or names of per-layer sizes such as ``"nnz"``) and dtype of a stored tensor."""

    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class Format:
    """One registered format."""

    name: str
    version: int
    spec_cls: type
    layer_cls: type
    #: config.json fields (besides format/format_version) the spec is built from
    spec_fields: tuple[str, ...]

    def spec_from_fields(self, fields: dict[str, Any]):
        """The spec from config fields (missing fields take the spec's defaults)."""
        return self.spec_cls(**{k: fields[k] for k in self.spec_fields if k in fields})


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Make ``fmt`` known by name (idempotent for the same object; a different one is an error)."""
    old = _FORMATS.get(fmt.name)
    if old is not None and old != fmt:
        raise ValueError(f"format {fmt.name!r} is already registered by {old.spec_cls.__module__}")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name_or_spec) -> Format:
    """The registered format by name, or the format a spec object belongs to."""
    name = name_or_spec if isinstance(name_or_spec, str) else getattr(name_or_spec, "format", None)
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise FormatError(f"format={name!r} is unknown; known formats: {sorted(_FORMATS)}")
    return fmt


def formats() -> dict[str, Format]:
    return dict(_FORMATS)


def layer_classes() -> tuple[type, ...]:
    return tuple(f.layer_cls for f in _FORMATS.values())


def is_compressed(module) -> bool:
    """True for a layer of any registered format."""
    return isinstance(module, layer_classes())


def expected_tensors(spec, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """``{name relative to the module: TensorSpec}`` a layer of ``spec`` stores (bias excluded)."""
    return spec.tensors(out_features, in_features)


def make_layer(spec, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype = torch.float32,
               device=None, sizes: dict[str, int] | None = None):
    """An empty layer of ``spec``'s format (buffers zero; per-layer sizes from ``sizes``)."""
    return get_format(spec).layer_cls(in_features, out_features, bias, spec, compute_dtype=compute_dtype,
                                      device=device, sizes=sizes)


def bind_sizes(tensors: dict[str, Any], spec, out_features: int, in_features: int, where: str) -> dict[str, int]:
    """Per-layer sizes (the string dims of ``spec.tensors``) read off stored tensors or shapes."""
    sizes: dict[str, int] = {}
    for name, ts in expected_tensors(spec, out_features, in_features).items():
        t = tensors.get(name)
        if t is None:
            continue
        shape = tuple(t.shape) if hasattr(t, "shape") else tuple(t)
        if len(shape) != len(ts.shape):
            continue  # reported by validate_tensors
        for dim, got in zip(ts.shape, shape):
            if isinstance(dim, str):
                if dim in sizes and sizes[dim] != got:
                    raise FormatError(f"{where}.{name} has {dim}={got}, but another tensor of the layer has "
                                      f"{dim}={sizes[dim]}")
                sizes[dim] = got
    return sizes


def validate_tensors(tensors: dict[str, torch.Tensor | None], spec, out_features: int, in_features: int,
                     where: str) -> dict[str, int]:
    """Check stored tensors against the spec (presence, shape, dtype, then the format's value
    checks); the error names the tensor and what is wrong. Returns the per-layer sizes."""
    fmt = get_format(spec)
    sizes = bind_sizes(tensors, spec, out_features, in_features, where)
    for name, ts in expected_tensors(spec, out_features, in_features).items():
        t = tensors.get(name)
        full = f"{where}.{name}"
        if t is None:
            raise FormatError(f"{full} is missing; the {fmt.name} spec {spec} requires it")
        if any(isinstance(d, str) and d not in sizes for d in ts.shape):
            raise FormatError(f"{full} has shape {tuple(t.shape)}, expected {ts.shape}")
        shape = ts.concrete(sizes)
        if tuple(t.shape) != shape:
            raise FormatError(f"{full} has shape {tuple(t.shape)}, expected {shape} for {spec} "
                              f"with out_features={out_features}, in_features={in_features}")
        if t.dtype != ts.dtype:
            raise FormatError(f"{full} has dtype {t.dtype}, expected {ts.dtype}")
    live = {n: t for n, t in tensors.items() if t is not None and not t.is_meta}
    spec.check_values(live, out_features, in_features, where)
    return sizes


def stored_bits(spec, out_features: int, in_features: int, sizes: dict[str, int] | None = None) -> int:
    """Bits of every stored tensor of one layer (bias excluded; padding included)."""
    total = 0
    for ts in expected_tensors(spec, out_features, in_features).values():
        n = 1
        for d in ts.concrete(sizes or {}):
            n *= d
        total += n * (torch.finfo(ts.dtype).bits if ts.dtype.is_floating_point else torch.iinfo(ts.dtype).bits)
    return total


def names(specs: Iterable) -> list[str]:
    return sorted({get_format(s).name for s in specs})

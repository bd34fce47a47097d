"""Compressed layers as an owner sends them: the format's stored tensors (codes, scales, zeros,
g_idx, outliers ... exactly what ``state_dict`` holds) plus a JSON description (format, spec
fields, shape, compute dtype). Any registered format travels this way; the receiver rebuilds the
layer through the format registry, bit for bit."""

from __future__ import annotations

import dataclasses

import torch

from ..formats import get_format


def layer_item(layer) -> dict:
    """A compressed layer -> ``{"meta": ..., "tensors": ...}`` for :meth:`DistContext.exchange`."""
    spec = layer.spec
    if not dataclasses.is_dataclass(spec):
        raise TypeError(f"{type(layer).__name__}: its spec {type(spec).__name__} is not a dataclass; distributed "
                        "calibration sends specs as their fields")
    tensors = dict(layer.stored_tensors())
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    meta = {"format": layer.format, "spec": dataclasses.asdict(spec), "in": layer.in_features,
            "out": layer.out_features, "bias": layer.bias is not None,
            "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}
    return {"meta": meta, "tensors": tensors}


def rebuild_layer(item: dict, device) -> torch.nn.Module:
    """The layer :func:`layer_item` described, on ``device``."""
    meta, tensors = item["meta"], dict(item["tensors"])
    fmt = get_format(meta["format"])
    spec = fmt.spec_cls(**meta["spec"])
    bias = tensors.pop("bias", None)
    layer = fmt.layer_cls(meta["in"], meta["out"], meta["bias"], spec, getattr(torch, meta["compute_dtype"]),
                          device=device)
    layer.load_packed(**{n: t.to(device) for n, t in tensors.items()})
    if bias is not None:
        layer.bias.data.copy_(bias.to(device))
    return layer

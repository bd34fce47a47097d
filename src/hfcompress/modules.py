"""Which linear layers of a model get compressed, and swapping them. Duck-typed on
transformers' public model attributes; no host-library internals."""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an nn.Linear or Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an nn.Linear or Conv1D."""
    return module.weight.t() if is_conv1d(module) else module.weight


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Tied weights and the output embedding (lm_head) stay in float by default."""
    return sorted(set(tied_modules(model)) | set(_output_embedding_names(model)))


def tied_modules(model: nn.Module) -> list[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied.keys()) | set(tied.values())
    return sorted({k.removesuffix(".weight") for k in keys})


def _output_embedding_names(model: nn.Module) -> list[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    if out is None:
        return []
    return [name for name, m in model.named_modules() if m is out]


def resolve_modules_to_not_convert(model: nn.Module, requested: list[str] | None, strict: bool = True) -> list[str]:
    """``None`` -> the defaults; a list -> that list plus tied weights (never quantize a tied copy).

    A requested name or pattern that matches no module of ``model`` (a typo would quantize the layer
    the user wanted kept) raises a ConfigError naming the closest module names; with
    ``strict=False`` (reloading a checkpoint) it warns instead."""
    if requested is None:
        return default_modules_to_not_convert(model)
    check_modules_exist(model, requested, strict)
    return sorted(set(requested) | set(tied_modules(model)))


def check_modules_exist(model: nn.Module, patterns: list[str], strict: bool = True) -> None:
    import difflib
    import warnings

    from .config import ConfigError

    names = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in patterns if not any(matches(n, [p]) for n in names)]
    if not unmatched:
        return
    candidates = sorted({".".join(n.split(".")[i:]) for n in names for i in range(len(n.split(".")))})
    parts = []
    for p in unmatched:
        close = difflib.get_close_matches(p, candidates, n=3, cutoff=0.6)
        parts.append(f"{p!r} matches no module" + (f" (closest: {', '.join(close)})" if close else ""))
    msg = (f"quantization_config.modules_to_not_convert: {'; '.join(parts)}; those layers would be quantized. "
           "Use module names from model.named_modules() (a dotted suffix such as 'mlp.down_proj' or a regex works)")
    if strict:
        raise ConfigError(msg)
    warnings.warn(msg, stacklevel=3)


def check_module_table(model: nn.Module, config, strict: bool = True) -> None:
    """The names of ``config``'s per-module format table must be linear layers it converts
    (a ConfigError naming the module; on reload, ``strict=False``, too: a table naming no layer
    does not describe the checkpoint)."""
    from .config import ConfigError
    from .formats.table import check_table_modules

    specs = getattr(config, "_module_specs", None)
    if not specs:
        return
    converted = {n for n, _ in linear_modules(model, config.modules_to_not_convert or [])}
    problems = check_table_modules(specs, converted, config.modules_to_not_convert or [], strict=False)
    if problems:
        raise ConfigError("quantization_config." + "; quantization_config.".join(problems))


def matches(name: str, patterns: list[str]) -> bool:
    """A pattern matches a module name from its start up to a module boundary, as a regex with
    the same boundary, or as a dotted suffix ("lm_head", "layers.0", "mlp.down_proj", "layers.*.q_proj")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for p in patterns:
        if name == p or name.endswith("." + p):
            return True
        try:
            if re.match(rf"(?:{p}){boundary}", name):
                return True
        except re.error:
            continue
    return False


def linear_modules(model: nn.Module, skip: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """Every nn.Linear / Conv1D not matched by ``skip``."""
    for name, module in list(model.named_modules()):
        if is_linear(module) and not matches(name, skip):
            yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``. A layer with a ``source_conv1d`` flag (QuantLinear) that replaces a
    GPT-2 ``Conv1D`` (or a layer that had replaced one) records it, so dequantizing restores a Conv1D."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if hasattr(new, "source_conv1d"):
        old = getattr(parent, child, None)
        new.source_conv1d = is_conv1d(old) or bool(getattr(old, "source_conv1d", False))
    setattr(parent, child, new)

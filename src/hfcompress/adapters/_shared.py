"""Adapter state shared by every layer of a model (a tuner-level container that each adapter
layer also references): save it once, copy it back to every layer's key on load."""

from __future__ import annotations

TOP = "base_model."


def keep_shared_once(selected: dict, state_dict: dict, attr: str, adapter_name: str) -> dict:
    """Drop the per-layer copies of ``attr``; keep the tuner-level ``base_model.<attr>.<adapter>...`` keys."""
    top = f"{TOP}{attr}.{adapter_name}"
    out = {k: v for k, v in selected.items() if f".{attr}." not in k or k.startswith(TOP + attr + ".")}
    tops = {k: v for k, v in state_dict.items() if k == top or k.startswith(top + ".")}
    if not tops:
        raise KeyError(f"adapter {adapter_name!r}: shared state {top!r} missing from the state dict "
                       "(only PeftModel-wrapped models are supported)")
    out.update(tops)
    return out


def copy_shared_to_layers(model, remapped: dict, attr: str, adapter_name: str) -> dict:
    """For every layer key ``<path>.<attr>.<adapter>[.<tail>]`` add the tensor saved under the
    tuner-level key ``base_model.<attr>.<adapter>[.<tail>]``."""
    top = f"{TOP}{attr}.{adapter_name}"
    marker = f".{attr}.{adapter_name}"
    for key in model.state_dict():
        if marker in key and not key.startswith(TOP + attr + "."):
            tail = key.split(marker, 1)[1]
            if top + tail in remapped:
                remapped[key] = remapped[top + tail]
    return remapped

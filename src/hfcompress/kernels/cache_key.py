"""The key under which a kernel caches a runtime layout derived from stored tensors: identity and
version counter of each tensor, so an in-place change (or a new tensor) invalidates the entry."""

from __future__ import annotations


def tensor_versions(*tensors):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        try:
            out.append((id(t), t._version))
        except RuntimeError:  # inference tensors carry no version counter
            out.append((id(t), None))
    return tuple(out)

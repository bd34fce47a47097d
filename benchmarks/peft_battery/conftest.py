"""Keeps only the checks parametrized with one of our methods (PEFT's method-specific tests, e.g.
LoRA's DoRA merges, are not part of the common battery) and tags each with its method."""

import rows


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        method = rows.method_of(params)
        if method is None:
            drop.append(item)
        else:
            item.user_properties.append(("method", method))
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep

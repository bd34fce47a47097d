"""The per-module format table: one checkpoint, several formats / bit widths.

``quantization_config.module_formats`` in config.json maps a module's full name to the spec of
its layer, as the format's own fields::

    "module_formats": {
        "model.layers.0.self_attn.q_proj": {"format": "int_group", "bits": 2, "group_size": 128, ...},
        "model.layers.0.mlp.down_proj":    {"format": "int_group", "bits": 8, "group_size": 128, ...},
    }

An entry names its ``format`` (default: the config's own) and optionally ``format_version``;
every other key is a field of that format's spec (missing fields take the config's values when
the format is the config's, else the spec's defaults). A module not in the table uses the
config's top-level spec; a module in ``modules_to_not_convert`` stays float and may not appear.
The table is resolved into spec objects once (:func:`resolve_table`); every loader builds each
layer from ``config.spec_for(name)``.
"""

from __future__ import annotations

from typing import Any

from .registry import FormatError, get_format, formats

#: keys of an entry besides the format's spec fields
ENTRY_KEYS = ("format", "format_version")


def resolve_table(table: dict | None, default_format: str, default_fields: dict[str, Any]) -> dict[str, Any]:
    """``{module name: spec}`` from the config.json table; errors name the module and the field."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise FormatError(f"module_formats must be a dict of module name -> spec fields, got {type(table).__name__}")
    specs = {}
    for name, entry in table.items():
        where = f"module_formats[{name!r}]"
        if not isinstance(name, str) or not name:
            raise FormatError(f"module_formats has a key {name!r}; keys are full module names (str)")
        if not isinstance(entry, dict):
            raise FormatError(f"{where} must be a dict of spec fields, got {type(entry).__name__} ({entry!r})")
        fmt_name = entry.get("format", default_format)
        if not isinstance(fmt_name, str) or fmt_name not in formats():
            raise FormatError(f"{where}.format={fmt_name!r} is unknown; known formats: {sorted(formats())}")
        fmt = get_format(fmt_name)
        version = entry.get("format_version", fmt.version)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= fmt.version:
            raise FormatError(f"{where}.format_version={version!r}: this hfcompress reads {fmt_name} versions "
                              f"1..{fmt.version}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS) - set(fmt.spec_fields))
        if unknown:
            raise FormatError(f"{where} has unknown field(s) {unknown}; the {fmt_name} format's fields are "
                              f"{list(fmt.spec_fields)}")
        fields = dict(default_fields) if fmt_name == default_format else {}
        fields.update({k: v for k, v in entry.items() if k not in ENTRY_KEYS})
        try:
            specs[name] = fmt.spec_from_fields(fields)
        except (FormatError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: {e}") from None
    return specs


def table_to_dict(specs: dict[str, Any]) -> dict[str, dict]:
    """The config.json form of a resolved table: every entry with its format and all its fields."""
    out = {}
    for name in sorted(specs):
        spec = specs[name]
        fmt = get_format(spec)
        fields = spec.to_dict()  # (a field at a default the spec does not write stays out)
        out[name] = {"format": fmt.name, **{k: fields[k] for k in fmt.spec_fields if k in fields}}
    return out


def check_table_modules(specs: dict[str, Any], converted: set[str], kept_float: list[str], strict: bool = True):
    """Every table name must be a linear module that is converted; otherwise the table does not
    describe the model. Returns the problems (raised as one FormatError when ``strict``)."""
    import difflib

    problems = []
    for name in sorted(specs):
        if name in converted:
            continue
        from ..modules import matches

        if matches(name, kept_float):
            problems.append(f"module_formats[{name!r}]: the module is in modules_to_not_convert (kept in float); "
                            "drop one of the two")
            continue
        close = difflib.get_close_matches(name, sorted(converted), n=3, cutoff=0.6)
        problems.append(f"module_formats[{name!r}]: no linear layer of the model has this name"
                        + (f" (closest: {', '.join(close)})" if close else "")
                        + "; keys are full names from model.named_modules()")
    if problems and strict:
        raise FormatError("; ".join(problems))
    return problems

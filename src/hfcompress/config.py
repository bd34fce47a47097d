"""Public quantization configs. transformers sees one ``quant_method``: "hfcompress".

The dict written to config.json names the *format* (how tensors are stored, versioned) and
the *algorithm* that chose the values; reloading needs only the format part, so any
algorithm's checkpoint reloads through the same layers.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats.int_group import FORMAT_NAME, FORMAT_VERSION, FormatError, IntGroupSpec

QUANT_METHOD = "hfcompress"
_ALGORITHMS: dict[str, type["HfCompressConfig"]] = {}


class ConfigError(ValueError):
    """A quantization config field with a wrong type or value; the message names the field."""


def register_algorithm(cls):
    """Class decorator: make ``cls.algorithm`` reloadable from config.json."""
    _ALGORITHMS[cls.algorithm] = cls
    return cls


def _check_type(name: str, value: Any, types: tuple, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"quantization_config.{name} must be {'/'.join(t.__name__ for t in types)}, got bool")
    if not isinstance(value, types):
        raise ConfigError(f"quantization_config.{name} must be {'/'.join(t.__name__ for t in types)}, "
                          f"got {type(value).__name__} ({value!r})")


class HfCompressConfig(QuantizationConfigMixin):
    """Base of every hfcompress quantization config (use a subclass such as :class:`RTNConfig`)."""

    algorithm: ClassVar[str] = ""
    #: True when the algorithm needs only the weight (quantizes each tensor as it loads)
    data_free: ClassVar[bool] = False
    #: algorithm options beyond the format: name -> (types, allow_none)
    options: ClassVar[dict[str, tuple[tuple, bool]]] = {}

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, act_order: bool = False,
                 modules_to_not_convert: list[str] | None = None, format: str = FORMAT_NAME,
                 format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        kwargs.pop("algorithm", None)
        _check_type("format_version", format_version, (int,))
        if format_version > FORMAT_VERSION:
            raise ConfigError(f"quantization_config.format_version={format_version} is newer than this hfcompress "
                              f"understands ({FORMAT_VERSION}); upgrade hfcompress to load this checkpoint")
        if format != FORMAT_NAME:
            raise ConfigError(f"quantization_config.format={format!r} is unknown; known formats: [{FORMAT_NAME!r}]")
        _check_type("bits", bits, (int,))
        _check_type("group_size", group_size, (int,))
        _check_type("sym", sym, (bool,))
        _check_type("act_order", act_order, (bool,))
        _check_type("modules_to_not_convert", modules_to_not_convert, (list, tuple), allow_none=True)
        if modules_to_not_convert is not None:
            for m in modules_to_not_convert:
                _check_type("modules_to_not_convert[]", m, (str,))
            modules_to_not_convert = list(modules_to_not_convert)
        try:
            IntGroupSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
        except FormatError as e:
            raise ConfigError(f"quantization_config: {e}") from None
        self.format = format
        self.format_version = format_version
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.act_order = act_order
        self.modules_to_not_convert = modules_to_not_convert
        for name, (types, allow_none) in self.options.items():
            if name in kwargs:
                value = kwargs.pop(name)
                _check_type(name, value, types, allow_none)
                setattr(self, name, value)
        self.extra = kwargs.pop("extra", None) or {}
        if kwargs:
            raise ConfigError(f"{type(self).__name__} got unknown field(s) {sorted(kwargs)}")

    @property
    def spec(self) -> IntGroupSpec:
        return IntGroupSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order)

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": QUANT_METHOD, "format": self.format, "format_version": self.format_version,
             "algorithm": self.algorithm, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
             "act_order": self.act_order, "modules_to_not_convert": self.modules_to_not_convert}
        for name in self.options:
            d[name] = self._jsonable(name, getattr(self, name))
        if self.extra:
            d["extra"] = copy.deepcopy(self.extra)
        return d

    def _jsonable(self, name: str, value):
        return value

    def quantize_weight(self, weight):
        """Data-free algorithms: ``weight [N, K]`` -> ``(codes, scale, zero, g_idx)``."""
        raise NotImplementedError(f"{self.algorithm} needs calibration data; it has no per-weight path")

    def calibrate_(self, model, **kwargs):
        """Calibration algorithms: quantize ``model`` in place (after its float weights loaded)."""
        raise NotImplementedError(f"{self.algorithm} is data-free; it has no calibration path")

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        if not isinstance(config_dict, dict):
            raise ConfigError(f"quantization_config must be a dict, got {type(config_dict).__name__}")
        d = dict(config_dict)
        algo = d.get("algorithm", cls.algorithm)
        target = _ALGORITHMS.get(algo)
        if target is None:
            raise ConfigError(f"quantization_config.algorithm={algo!r} is unknown; known: {sorted(_ALGORITHMS)}")
        config = target(**d)
        return (config, kwargs) if return_unused_kwargs else config

    def __eq__(self, other):
        return isinstance(other, HfCompressConfig) and self.to_dict() == other.to_dict()


@register_algorithm
class RTNConfig(HfCompressConfig):
    """Round-to-nearest, data-free: quantizes each weight as it loads.

    ``mse_clip=True`` searches, per group, the clipping range that minimises the squared
    rounding error (a grid over shrink factors) instead of plain min-max.
    """

    algorithm = "rtn"
    data_free = True
    options = {"mse_clip": ((bool,), False)}

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, mse_clip: bool = True,
                 modules_to_not_convert: list[str] | None = None, **kwargs):
        self.mse_clip = mse_clip
        if kwargs.get("act_order"):
            raise ConfigError("quantization_config.act_order=True needs activation statistics; RTN is data-free")
        super().__init__(bits=bits, group_size=group_size, sym=sym, modules_to_not_convert=modules_to_not_convert,
                         mse_clip=mse_clip, **kwargs)

    def quantize_weight(self, weight):
        from .algorithms.rtn import rtn

        return rtn(weight, self.spec, mse_clip=self.mse_clip)

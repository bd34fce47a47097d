"""Public quantization configs. transformers sees one ``quant_method``: "hfcompress".

The dict written to config.json names the *format* (how tensors are stored, versioned) and
the *algorithm* that chose the values; reloading needs only the format part, so any
algorithm's checkpoint reloads through the same layers.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin


QUANT_METHOD = "hfcompress"
_ALGORITHMS: dict[str, type["HfCompressConfig"]] = {}


class ConfigError(ValueError):
    """A quantization config field with a wrong type or value; the message names the field."""


def register_algorithm(cls):
    """Class decorator: make ``cls.algorithm`` reloadable from config.json (and the class
    reachable as ``hfcompress.<ClassName>``; the CLI offers it when it defines ``add_cli_arguments``)."""
    _ALGORITHMS[cls.algorithm] = cls
    return cls


def algorithms() -> dict[str, type["HfCompressConfig"]]:
    """Registered algorithm name -> config class."""
    return dict(_ALGORITHMS)


def _check_type(name: str, value: Any, types: tuple, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"quantization_config.{name} must be {'/'.join(t.__name__ for t in types)}, got bool")
    if not isinstance(value, types):
        raise ConfigError(f"quantization_config.{name} must be {'/'.join(t.__name__ for t in types)}, "
                          f"got {type(value).__name__} ({value!r})")


#: fields of transformers' GPTQConfig that have another name here
_TRANSFORMERS_NAMES = {"desc_act": "act_order", "damp_percent": "damp", "model_seqlen": "seq_len"}


class HfCompressConfig(QuantizationConfigMixin):
    """Base of every hfcompress quantization config (use a subclass such as :class:`RTNConfig`)."""

    algorithm: ClassVar[str] = ""
    #: the format this algorithm writes by default (a registered format name)
    format_name: ClassVar[str] = "int_group"
    #: True when the algorithm needs only the weight (quantizes each tensor as it loads)
    data_free: ClassVar[bool] = False
    #: algorithm options beyond the format: name -> (types, allow_none)
    options: ClassVar[dict[str, tuple[tuple, bool]]] = {}
    #: ``zero_point`` when none is given, for asymmetric grids of a format that stores float zeros
    #: (symmetric grids and other formats: "int"). A config.json without the field is "int" (from_dict).
    default_zero_point: ClassVar[str] = "int"

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, act_order: bool = False,
                 modules_to_not_convert: list[str] | None = None, format: str | None = None,
                 format_version: int | None = None, zero_point: str | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        kwargs.pop("algorithm", None)
        format = type(self).format_name if format is None else format
        _check_type("format", format, (str,))
        if format not in formats():
            raise ConfigError(f"quantization_config.format={format!r} is unknown; known formats: {sorted(formats())}")
        fmt = get_format(format)
        format_version = fmt.version if format_version is None else format_version
        _check_type("format_version", format_version, (int,))
        if format_version < 1:
            raise ConfigError(f"quantization_config.format_version={format_version} is not a version hfcompress ever "
                              f"wrote (versions start at 1; this hfcompress writes {fmt.version}); the config.json "
                              "was edited or written by something else")
        if format_version > fmt.version:
            raise ConfigError(f"quantization_config.format_version={format_version} is newer than this hfcompress "
                              f"understands ({fmt.version}); upgrade hfcompress to load this checkpoint")
        _check_type("bits", bits, (int,))
        _check_type("group_size", group_size, (int,))
        _check_type("sym", sym, (bool,))
        _check_type("act_order", act_order, (bool,))
        if zero_point is None:
            zero_point = (type(self).default_zero_point
                          if sym is False and "zero_point" in fmt.spec_fields else "int")
        _check_type("zero_point", zero_point, (str,))
        if zero_point != "int" and "zero_point" not in fmt.spec_fields:
            raise ConfigError(f"quantization_config.zero_point={zero_point!r}: the {format} format stores no float "
                              "zero points; use zero_point='int' (or format='int_group')")
        _check_type("modules_to_not_convert", modules_to_not_convert, (list, tuple), allow_none=True)
        if modules_to_not_convert is not None:
            for m in modules_to_not_convert:
                _check_type("modules_to_not_convert[]", m, (str,))
            modules_to_not_convert = list(modules_to_not_convert)
        self.format = format
        self.format_version = format_version
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.act_order = act_order
        self.zero_point = zero_point  # int_group: "int" (packed integers) or "float" (fp16 per group)
        self.modules_to_not_convert = modules_to_not_convert
        for name, (types, allow_none) in self.options.items():
            if name in kwargs:
                value = kwargs.pop(name)
                _check_type(name, value, types, allow_none)
                setattr(self, name, value)
        save_id = kwargs.pop("save_id", None)  # identity of the save that wrote config.json (hfcompress.integrity)
        _check_type("save_id", save_id, (str,), allow_none=True)
        self.save_id = save_id
        extra = kwargs.pop("extra", None)
        _check_type("extra", extra, (dict,), allow_none=True)
        self.extra = extra or {}
        module_formats = kwargs.pop("module_formats", None)  # the per-module table (formats/table.py)
        if kwargs:
            renamed = [f"{k} -> {_TRANSFORMERS_NAMES[k]}" for k in sorted(kwargs) if k in _TRANSFORMERS_NAMES]
            raise ConfigError(f"{type(self).__name__} got unknown field(s) {sorted(kwargs)}"
                              + (f" (transformers' GPTQConfig names; here: {', '.join(renamed)})" if renamed else ""))
        try:
            self.spec
        except FormatError as e:
            raise ConfigError(f"quantization_config: {e}") from None
        self.module_formats = module_formats

    @property
    def spec(self):
        """The format spec of every converted layer (built by the registered format from the fields)."""
        return get_format(self.format).spec_from_fields(vars(self))

    def spec_for(self, module_name: str):
        """The spec of one module: its ``module_formats`` entry, else the config's own spec."""
        return self._module_specs.get(module_name) or self.spec

    @property
    def module_formats(self) -> dict[str, dict]:
        """The per-module table as config.json stores it (empty: one spec for every module)."""
        table = table_to_dict(self._module_specs)
        for name, spec in self._module_specs.items():
            # a spec leaves zero_point="int" out, and an entry without it inherits the config's own
            if getattr(spec, "zero_point", None) == "int" and self.zero_point != "int":
                table[name]["zero_point"] = "int"
        return table

    @module_formats.setter
    def module_formats(self, table: dict | None) -> None:
        try:
            self._module_specs = resolve_table(table, self.format, vars(self))
        except FormatError as e:
            raise ConfigError(f"quantization_config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": QUANT_METHOD, "format": self.format, "format_version": self.format_version,
             "algorithm": self.algorithm, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
             "act_order": self.act_order, "modules_to_not_convert": self.modules_to_not_convert}
        if self.zero_point != "int":  # written only when set: configs from before the field stay byte-identical
            d["zero_point"] = self.zero_point
        for name in self.options:
            d[name] = self._jsonable(name, getattr(self, name))
        if self.extra:
            d["extra"] = copy.deepcopy(self.extra)
        if self._module_specs:
            d["module_formats"] = self.module_formats
        if getattr(self, "save_id", None):
            d["save_id"] = self.save_id
        return d

    def _jsonable(self, name: str, value):
        return value

    def check_can_quantize(self) -> None:
        """Raise before any work if this config cannot *produce* a checkpoint (it may still load one)."""

    def quantize_weight(self, weight, spec=None):
        """Data-free algorithms: ``weight [N, K]`` -> the algorithm's output that the format's
        ``layer_cls.from_codes`` takes (int_group: ``(codes, scale, zero, g_idx)``) on ``spec``
        (default: the config's own)."""
        raise NotImplementedError(f"{self.algorithm} needs calibration data; it has no per-weight path")

    def quantize_group(self, modules: dict, H, where: str) -> dict:
        """Calibration algorithms: float linear layers reading one input with Hessian ``H [K, K]``
        -> ``{name: compressed layer}`` (run by ``calibration.apply.quantize_blocks_``)."""
        raise NotImplementedError(f"{self.algorithm} has no calibration path")

    def fallback_layer(self, module, name: str):
        """A linear layer outside the calibrated blocks (no inputs reach it): data-free layer of
        the format (int_group: RTN with MSE clip on the spec's grid)."""
        from .modules import linear_weight

        spec = self.spec_for(name)
        return get_format(spec).layer_cls.from_float(linear_weight(module), module.bias, spec)

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
        _check_type("algorithm", algo, (str,))
        target = _ALGORITHMS.get(algo)
        if target is None:
            raise ConfigError(f"quantization_config.algorithm={algo!r} is unknown; known: {sorted(_ALGORITHMS)}")
        # to_dict writes zero_point only when it is not "int", and checkpoints from before the field
        # have none: absent means integer zeros, whatever the config class's default for new configs
        d.setdefault("zero_point", "int")
        config = target(**d)
        return (config, kwargs) if return_unused_kwargs else config

    def __eq__(self, other):
        drop = {"save_id"}  # which save wrote it, not what it describes
        return isinstance(other, HfCompressConfig) and (
            {k: v for k, v in self.to_dict().items() if k not in drop}
            == {k: v for k, v in other.to_dict().items() if k not in drop})


@register_algorithm
class RTNConfig(HfCompressConfig):
    """Round-to-nearest, data-free: quantizes each weight as it loads.

    Asymmetric grids store float zero points by default (``zero_point="float"``: one fp16 zero per
    group, HQQ's half-quadratic zero fitted from min-max's integer start; measured better than
    integer zeros on SmolLM2-135M 4-bit g64: benchmarks/README.md); ``zero_point="int"`` packs
    integer zeros (the min-max grid; what compressed-tensors export needs).
    ``mse_clip=True`` searches, per group, the grid with the least squared rounding error
    (``algorithms.grid.search_grid``: clipped ranges, both zeros next to min-max's, least-squares
    refinement; min-max is one candidate). It is off by default because, although its weight
    error and per-layer output error are lower, it measured worse in perplexity on a real model
    (SmolLM2-135M, 4-bit g64, geometric mean of four domains: benchmarks/README.md).
    """

    algorithm = "rtn"
    data_free = True
    default_zero_point = "float"
    options = {"mse_clip": ((bool,), False)}

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, mse_clip: bool = False,
                 modules_to_not_convert: list[str] | None = None, **kwargs):
        self.mse_clip = mse_clip
        super().__init__(bits=bits, group_size=group_size, sym=sym, modules_to_not_convert=modules_to_not_convert,
                         mse_clip=mse_clip, **kwargs)

    def check_can_quantize(self) -> None:
        if self.act_order:
            raise ConfigError("quantization_config.act_order=True: RTN has no activation statistics to order "
                              "columns by; use act_order=False (or GPTQConfig)")

    def quantize_weight(self, weight, spec=None):
        from .algorithms.rtn import rtn

        return rtn(weight, self.spec if spec is None else spec, mse_clip=self.mse_clip)


@register_algorithm
class GPTQConfig(HfCompressConfig):
    """GPTQ: one-shot second-order quantization, calibrated block by block on text.

    ``act_order`` quantizes columns by descending activation energy; ``static_groups`` (default)
    keeps the natural groups, their grids fitted before the column loop (no ``g_idx`` stored:
    faster kernels), ``static_groups=False`` groups columns in act-order and stores ``g_idx``
    (with ``act_order=False`` columns and groups are natural either way);
    asymmetric grids store float zero points by default (``zero_point="float"``: fp16 per group;
    ``"int"`` packs integer zeros, what compressed-tensors export needs). Float zeros with static
    groups measured best on SmolLM2 (benchmarks/README.md, "GPTQ defaults");
    ``damp`` is the Hessian dampening relative to its mean diagonal; ``mse_clip`` (default) fits
    each asymmetric group's grid with the searched grid weighted by GPTQ's own cost of each
    column's error (``algorithms.gptq.group_grid``; measured better than min-max grids on SmolLM2:
    benchmarks/README.md); ``dataset`` / ``n_samples`` / ``seq_len`` choose the calibration
    tokens (``None``: the bundled public-domain text); ``true_sequential`` calibrates each group
    of layers in a block (q/k/v, o, gate/up, down) on the outputs of those already quantized.
    """

    algorithm = "gptq"
    data_free = False
    default_zero_point = "float"
    options = {
        "static_groups": ((bool,), False),
        "damp": ((float, int), False),
        "mse_clip": ((bool,), False),
        "dataset": ((str, list, tuple, object), True),
        "n_samples": ((int,), False),
        "seq_len": ((int,), False),
        "true_sequential": ((bool,), False),
    }

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, act_order: bool = True,
                 static_groups: bool = True, damp: float = 0.01, mse_clip: bool = True, dataset=None,
                 n_samples: int = 128, seq_len: int = 512, true_sequential: bool = True,
                 modules_to_not_convert: list[str] | None = None, tokenizer=None, **kwargs):
        # tokenizer= as in transformers' GPTQConfig: a tokenizer or its directory / Hub id (used to
        # tokenize a text dataset; not written to config.json)
        if not (tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) or callable(tokenizer)):
            raise ConfigError(f"quantization_config.tokenizer must be a tokenizer or the directory / Hub id of one, "
                              f"got {type(tokenizer).__name__}")
        tokenizer = os.fspath(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        self.tokenizer = tokenizer
        super().__init__(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                         modules_to_not_convert=modules_to_not_convert, static_groups=static_groups, damp=damp,
                         mse_clip=mse_clip, dataset=dataset, n_samples=n_samples, seq_len=seq_len,
                         true_sequential=true_sequential, **kwargs)
        _check_dataset(self.dataset)
        if not 0 <= self.damp < 1:
            raise ConfigError(f"quantization_config.damp={self.damp!r} must be in [0, 1) (fraction of mean diag H; "
                              "0.01 is usual)")
        for name in ("n_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quantization_config.{name}={getattr(self, name)!r} must be a positive int")

    @property
    def spec(self) -> IntGroupSpec:
        # static groups keep the natural grouping: nothing to store beyond the plain format
        return IntGroupSpec(bits=self.bits, group_size=self.group_size, sym=self.sym,
                            act_order=self.act_order and not self.static_groups, zero_point=self.zero_point)

    def _jsonable(self, name: str, value):
        if name == "dataset" and value is not None and not isinstance(value, str):
            return "<in-memory dataset>"
        return value

    def quantize_group(self, modules: dict, H, where: str) -> dict:
        from .calibration.apply import gptq_group

        return gptq_group(modules, H, self, where)

    def calibrate_(self, model, progress: bool = False, tokenizer=None, batches=None, device=None, **kwargs):
        """Quantize ``model`` in place. Calibration tokens: ``batches`` (list of LongTensor
        ``[b, s]``) if given, else ``dataset`` tokenized with ``tokenizer`` (default: the model's
        own, loaded from ``model.name_or_path``)."""
        return calibrate_blocks_(self, model, progress=progress, tokenizer=tokenizer, batches=batches, device=device)

    def calibration_tokenizer(self, tokenizer=None):
        """``tokenizer`` if given, else ``GPTQConfig(tokenizer=...)`` (a path / Hub id is loaded), else None."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(tokenizer)
            except (OSError, ValueError) as e:
                first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                raise ConfigError(f"quantization_config.tokenizer={tokenizer!r} does not load a tokenizer ({first}); "
                                  "pass a tokenizer object or the directory / Hub id of one") from None
        return tokenizer


def calibrate_blocks_(config, model, progress: bool = False, tokenizer=None, batches=None, device=None):
    """The calibration driver of every block-wise algorithm (GPTQ, SpQR ...): calibration tokens
    from ``batches`` or ``config.dataset`` / ``n_samples`` / ``seq_len``, then
    ``calibration.apply.quantize_blocks_`` (which calls ``config.quantize_group``)."""
    from .calibration import get_calibration_batches
    from .calibration.data import token_ids
    from .calibration.apply import quantize_blocks_

    if batches is None:
        tokenizer = getattr(config, "calibration_tokenizer", lambda t: t)(tokenizer)
        if tokenizer is None and token_ids(config.dataset) is None:
            tokenizer = _model_tokenizer(model)
        dataset = None if config.dataset == "<in-memory dataset>" else config.dataset
        batches = get_calibration_batches(tokenizer, dataset, n_samples=config.n_samples, seq_len=config.seq_len)
    return quantize_blocks_(model, config, batches, device=device, progress=progress)


def _check_dataset(dataset) -> None:
    """Refuse at construction a calibration source that ``calibration.data`` cannot read."""
    import os
    from collections.abc import Iterable

    import torch

    if (dataset is None or isinstance(dataset, (str, os.PathLike, torch.Tensor)) or hasattr(dataset, "column_names")
            or (isinstance(dataset, Iterable) and not isinstance(dataset, (bytes, dict)))):
        return
    raise ConfigError(f"quantization_config.dataset must be None (the bundled text), a path or bundled text name, a "
                      "list of strings, token ids (an integer tensor or a list of lists of ints) or a "
                      f"datasets.Dataset with a 'text' column; got {type(dataset).__name__} ({dataset!r})")


def _model_tokenizer(model):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("GPTQ calibration needs a tokenizer: pass tokenizer=... (or batches=...) to "
                          "hfcompress.quantize_, or load the model from a directory that has one")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        raise ConfigError(f"GPTQ calibration needs a tokenizer and {path!r} has none; pass "
                          "GPTQConfig(tokenizer=...) (a tokenizer, or the directory / Hub id of one)") from None


# Formats are imported last: a format folder may define its own config class on top of this
# module (e.g. formats/spqr/config.py), so everything above must exist when it is imported.
from .formats import FormatError, formats, get_format  # noqa: E402
from .formats.table import resolve_table, table_to_dict  # noqa: E402
from .formats.int_group import IntGroupSpec  # noqa: E402

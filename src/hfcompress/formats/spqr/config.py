"""SpQRConfig: the SpQR algorithm writing the spqr format (calibrated block by block)."""

from __future__ import annotations

import math

import torch

from ...config import ConfigError, HfCompressConfig, calibrate_blocks_, register_algorithm
from .spec import SpQRSpec


@register_algorithm
class SpQRConfig(HfCompressConfig):
    """SpQR (Dettmers et al., 2023): GPTQ-style pass with small groups (``group_size`` 16),
    first-level scales quantized to ``stat_bits`` in groups of ``stat_group_size`` rows, and
    outliers (``outlier_threshold`` = tau, relative to the mean Hessian-weighted error; ``None``
    or ``inf``: no outliers) kept in fp16 in a sparse matrix. On SmolLM2-135M the default 2.0 kept
    0.04% of the first block's weights (3.58 bits per weight, everything counted); 0.2 kept 2% of
    the first two blocks' (4.23). ``act_order`` quantizes (and stores) the columns by descending
    activation energy. ``damp``, ``dataset``, ``n_samples``,
    ``seq_len``, ``true_sequential`` as in :class:`~hfcompress.GPTQConfig`. ``module_formats``
    (a per-module table of spqr spec fields, ``hfcompress.formats.table``) gives single layers
    their own bits / group sizes / act-order, e.g. 4-bit layers where the error costs most
    (``benchmarks/spqr_mixed.py`` chooses such a table from calibration statistics).
    """

    algorithm = "spqr"
    format_name = "spqr"
    data_free = False
    options = {
        "stat_bits": ((int,), False),
        "stat_group_size": ((int,), False),
        "outlier_threshold": ((float, int), True),
        "damp": ((float, int), False),
        "dataset": ((str, list, tuple, object), True),
        "n_samples": ((int,), False),
        "seq_len": ((int,), False),
        "true_sequential": ((bool,), False),
    }

    def __init__(self, bits: int = 3, group_size: int = 16, stat_bits: int = 3, stat_group_size: int = 16,
                 outlier_threshold: float | None = 2.0, act_order: bool = True, damp: float = 0.01, dataset=None,
                 n_samples: int = 128, seq_len: int = 512, true_sequential: bool = True,
                 modules_to_not_convert: list[str] | None = None, sym: bool = False, **kwargs):
        if sym is not False:
            raise ConfigError("quantization_config.sym=True: SpQR's grids are asymmetric (sym=False)")
        super().__init__(bits=bits, group_size=group_size, sym=False, act_order=act_order,
                         modules_to_not_convert=modules_to_not_convert, stat_bits=stat_bits,
                         stat_group_size=stat_group_size, outlier_threshold=outlier_threshold, damp=damp,
                         dataset=dataset, n_samples=n_samples, seq_len=seq_len, true_sequential=true_sequential,
                         **kwargs)
        for name, spec in self._module_specs.items():
            if spec.format != self.format_name:
                raise ConfigError(f"quantization_config.module_formats[{name!r}].format={spec.format!r}: SpQRConfig "
                                  f"quantizes every layer with SpQR; its entries are spqr spec fields "
                                  f"(bits, group_size, stat_bits, stat_group_size, act_order)")
        tau = self.outlier_threshold
        if tau is not None and not (tau > 0):
            raise ConfigError(f"quantization_config.outlier_threshold={tau!r} must be > 0 (or None: no outliers)")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"quantization_config.damp={self.damp!r} must be in [0, 1)")
        for name in ("n_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quantization_config.{name}={getattr(self, name)!r} must be a positive int")

    @property
    def spec(self) -> SpQRSpec:
        return SpQRSpec(bits=self.bits, group_size=self.group_size, stat_bits=self.stat_bits,
                        stat_group_size=self.stat_group_size, act_order=self.act_order)

    @property
    def tau(self) -> float:
        t = self.outlier_threshold
        return float("inf") if t is None or math.isinf(t) else float(t)

    def _jsonable(self, name: str, value):
        if name == "dataset" and value is not None and not isinstance(value, str):
            return "<in-memory dataset>"
        if name == "outlier_threshold" and value is not None and math.isinf(value):
            return None
        return value

    def calibrate_(self, model, progress: bool = False, tokenizer=None, batches=None, device=None, **kwargs):
        return calibrate_blocks_(self, model, progress=progress, tokenizer=tokenizer, batches=batches, device=device)

    def quantize_group(self, modules: dict, H, where: str) -> dict:
        """Layers reading one input: the Hessian is factored once, each layer is quantized on it."""
        from ...algorithms.spqr import prepare_hessian, spqr
        from ...modules import linear_weight
        from .layer import SpQRLinear

        first = next(iter(modules))
        spec = self.spec_for(first)  # the per-module table (module_formats) may give a layer its own spec
        out = {}
        try:
            k = modules[first]
            spec.check_layer(linear_weight(k).shape[1], where=where)
            hessian = prepare_hessian(H, self.damp, spec.act_order)
            for name, module in modules.items():
                w = linear_weight(module)  # [N, K]
                result = spqr(w, hessian, spec.bits, spec.group_size, spec.stat_bits, spec.stat_group_size, self.tau)
                out[name] = SpQRLinear.from_codes(result, spec, bias=module.bias, compute_dtype=w.dtype)
        except (ValueError, RuntimeError) as e:  # torch.linalg errors are RuntimeErrors
            raise type(e)(f"{where}: {e}") from None
        return out

    def fallback_layer(self, module, name: str):
        from ...modules import linear_weight
        from .layer import SpQRLinear

        w = linear_weight(module)
        return SpQRLinear.from_float(w, module.bias, self.spec_for(name), outlier_threshold=float("inf"))

    @classmethod
    def add_cli_arguments(cls, group) -> None:
        group.add_argument("--stat-bits", type=int, default=3, help="spqr: bits of the quantized group scales")
        group.add_argument("--stat-group-size", type=int, default=16, help="spqr: rows per second-level group")
        group.add_argument("--outlier-threshold", type=float, default=2.0,
                           help="spqr: tau (relative); larger keeps fewer outliers; 'inf' keeps none")

    @classmethod
    def cli_kwargs(cls, args) -> dict:
        return dict(stat_bits=args.stat_bits, stat_group_size=args.stat_group_size,
                    outlier_threshold=args.outlier_threshold, act_order=not args.no_act_order, damp=args.damp,
                    dataset=args.dataset, n_samples=args.n_samples, seq_len=args.seq_len)

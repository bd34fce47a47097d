"""BitStackConfig: the BitStack decomposition written in the bitstack format."""

from __future__ import annotations

import torch

from ...config import ConfigError, HfCompressConfig, _check_dataset, register_algorithm
from .spec import BitStackSpec


@register_algorithm
class BitStackConfig(HfCompressConfig):
    """BitStack (Wang et al., 2024): each linear weight, scaled per input channel by the rms of
    its calibration activations, decomposed into ``n_blocks`` residual blocks (sign plane x
    rank-``rank`` magnitude); blocks of all layers stacked so any prefix is a model.
    ``memory_budget`` (e.g. ``"60MB"``): after the decomposition keep the longest prefix that
    fits (the checkpoint then holds only those blocks); a saved checkpoint loads under any
    budget with ``hfcompress.formats.bitstack.load_under_budget``. ``dataset``, ``n_samples``,
    ``seq_len`` as in GPTQConfig (``dataset=False``: no data, scale 1)."""

    algorithm = "bitstack"
    format_name = "bitstack"
    data_free = False
    options = {
        "rank": ((int,), False),
        "n_blocks": ((int,), False),
        "memory_budget": ((str, int), True),
        "dataset": ((str, list, tuple, bool, object), True),
        "n_samples": ((int,), False),
        "seq_len": ((int,), False),
    }

    def __init__(self, rank: int = 16, n_blocks: int = 4, memory_budget: str | int | None = None, dataset=None,
                 n_samples: int = 128, seq_len: int = 512, modules_to_not_convert: list[str] | None = None,
                 **kwargs):
        for f in ("bits", "group_size", "sym", "act_order"):
            kwargs.pop(f, None)
        self.tokenizer = kwargs.pop("tokenizer", None)
        super().__init__(bits=4, group_size=128, modules_to_not_convert=modules_to_not_convert, rank=rank,
                         n_blocks=n_blocks, memory_budget=memory_budget, dataset=dataset, n_samples=n_samples,
                         seq_len=seq_len, **kwargs)
        if self.dataset is not False:
            _check_dataset(self.dataset)
        if self.n_blocks < 1:
            raise ConfigError(f"quantization_config.n_blocks={self.n_blocks!r} must be a positive int")
        if self.memory_budget is not None:
            from .stack import parse_budget

            parse_budget(self.memory_budget)

    @property
    def spec(self) -> BitStackSpec:
        return BitStackSpec(rank=self.rank)

    def _jsonable(self, name: str, value):
        if name == "dataset" and value is not None and not isinstance(value, str):
            return "<in-memory dataset>"
        return value

    @torch.no_grad()
    def calibrate_(self, model, progress: bool = False, tokenizer=None, batches=None, device=None, **kwargs):
        """Activation scales from the float model's calibration inputs, then every layer decomposed."""
        from ...algorithms.bitstack import activation_scale, bitstack_decompose
        from ...calibration.blocks import iterate_blocks
        from ...modules import linear_modules, linear_weight, set_submodule
        from .layer import BitStackLinear

        skip = self.modules_to_not_convert or []
        scales: dict[str, torch.Tensor] = {}
        if self.dataset is not False:
            if batches is None:
                from ...calibration import get_calibration_batches
                from ...config import _model_tokenizer

                tokenizer = tokenizer or self.tokenizer or _model_tokenizer(model)
                dataset = None if self.dataset == "<in-memory dataset>" else self.dataset
                batches = get_calibration_batches(tokenizer, dataset, n_samples=self.n_samples, seq_len=self.seq_len)
            for step in iterate_blocks(model, batches, skip=skip, device=device, progress=progress,
                                       desc="bitstack activation scales"):
                stats = step.collect_input_stats()  # float inputs: nothing is swapped while iterating
                for rel, st in stats.items():
                    scales[f"{step.name}.{rel}"] = activation_scale(torch.diagonal(st.xtx), st.n_tokens).cpu()
        for name, module in list(linear_modules(model, skip)):
            w = linear_weight(module)
            s = scales.get(name, torch.ones(w.shape[1]))
            signs, u, v, gain = bitstack_decompose(w, s.to(w.device), self.n_blocks, self.rank)
            layer = BitStackLinear.from_decomposition(signs, u, v, s, gain, self.spec, bias=module.bias,
                                                      compute_dtype=w.dtype)
            set_submodule(model, name, layer.to(w.device))
        if self.memory_budget is not None:
            from .stack import resize_

            resize_(model, self.memory_budget)
        return model

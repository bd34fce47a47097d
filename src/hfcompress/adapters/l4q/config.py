"""L4QConfig: the PEFT config of L4Q, and the quantization config its exported checkpoints carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...config import ConfigError, HfCompressConfig, register_algorithm
from ...formats.int_group import FormatError, IntGroupSpec

NAME = "l4q"
INIT_SCALES = ("minmax", "mse")


@dataclass
class L4QConfig(PeftConfig):
    """Quantization-aware LoRA with learned per-group step sizes (and integer offsets when
    ``sym=False``). Every target linear computes with ``W_q = Q(W0 + lora_alpha/r * B A)``;
    :func:`hfcompress.l4q.export` / ``merge_and_unload()`` turn the result into an int_group
    checkpoint (``bits``, ``group_size``, ``sym``) with no LoRA branch left.

    Args:
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scaling = lora_alpha / r).
        bits, group_size, sym: the integer grid trained for and exported (int_group format).
        init_scales: initial steps/offsets from the frozen weight: ``"minmax"`` (range of each
            group) or ``"mse"`` (clipping searched per group for the least squared error).
        target_modules: module names / regex / ``"all-linear"`` (default: every linear layer
            but the output head).
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in LoRA.
        init_weights: ``True`` = A Kaiming-uniform, B zero (the model starts as the
            ``init_scales`` quantized model); ``False`` = B also random (tests only). The name
            every non-LoRA PEFT method uses; ``init_lora_weights`` is accepted as an alias (older
            adapter configs carry it).
    """

    r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = lora_alpha / r)"})
    bits: int = field(default=4, metadata={"help": "bits per weight code (2, 3, 4 or 8)"})
    group_size: int = field(default=128, metadata={"help": "input channels per step size; -1 = per output channel"})
    sym: bool = field(default=False, metadata={"help": "symmetric grid (no learned offset)"})
    init_scales: str = field(default="minmax", metadata={"help": "'minmax' or 'mse'"})
    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear", metadata={"help": "module names, a regex, or 'all-linear'"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_weights: bool = field(default=True)
    init_lora_weights: Optional[bool] = field(default=None, metadata={"help": "alias of init_weights"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(NAME.upper())
        if self.init_lora_weights is not None:  # the older name wins only when given
            self.init_weights, self.init_lora_weights = bool(self.init_lora_weights), None
        for name in ("r", "lora_alpha", "bits", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"L4QConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
        if self.r < 1:
            raise ConfigError(f"L4QConfig.r must be >= 1, got {self.r}")
        if not isinstance(self.sym, bool):
            raise ConfigError(f"L4QConfig.sym must be a bool, got {type(self.sym).__name__}")
        if self.init_scales not in INIT_SCALES:
            raise ConfigError(f"L4QConfig.init_scales={self.init_scales!r} is unknown; choose one of {INIT_SCALES}")
        try:
            self.spec
        except FormatError as e:
            raise ConfigError(f"L4QConfig: {e}") from None
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.modules_to_save:
            raise ConfigError("L4QConfig.modules_to_save is not supported: the exported checkpoint holds quantized "
                              "linears and the float model; train other modules with a separate adapter")

    @property
    def spec(self) -> IntGroupSpec:
        return IntGroupSpec(bits=self.bits, group_size=self.group_size, sym=self.sym)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@register_algorithm
class L4QQuantConfig(HfCompressConfig):
    """What an exported L4Q checkpoint's config.json says: int_group values chosen by L4Q
    training. Reloading needs only the format part; quantizing with it is not possible (L4Q
    trains: ``get_peft_model(model, L4QConfig(...))``, then :func:`hfcompress.l4q.export`)."""

    algorithm = NAME
    data_free = False
    options = {"r": ((int,), True), "lora_alpha": ((int,), True), "init_scales": ((str,), True)}

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, r: int | None = None,
                 lora_alpha: int | None = None, init_scales: str | None = None,
                 modules_to_not_convert: list[str] | None = None, **kwargs):
        self.r, self.lora_alpha, self.init_scales = r, lora_alpha, init_scales
        super().__init__(bits=bits, group_size=group_size, sym=sym, modules_to_not_convert=modules_to_not_convert,
                         r=r, lora_alpha=lora_alpha, init_scales=init_scales, **kwargs)

    def calibrate_(self, model, **kwargs):
        raise ConfigError("quantization_config.algorithm='l4q' cannot quantize a float model on load: L4Q is "
                          "trained. Use peft.get_peft_model(model, hfcompress.L4QConfig(...)), train, then "
                          "hfcompress.l4q.export(peft_model, out_dir)")

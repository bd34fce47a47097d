"""EoRA compensation of a compressed model, exported as a standard PEFT LoRA adapter.

``compensate(compressed_model, original=float_model_or_dir, config=EoRAConfig(rank=32))``
returns a ``peft.PeftModel`` whose adapter is plain LoRA (``lora_A = A``, ``lora_B = B``,
``r = lora_alpha`` so the scaling is 1; per-module ``rank_pattern``/``alpha_pattern`` when a
layer is too small for the rank). The compressed base stays compressed. The adapter loads
anywhere plain LoRA loads: on the compressed model (after ``import hfcompress``), on the
float model, or on a dequantized copy with vanilla peft.

Compressed layers understood (:func:`compressed_weight`): hfcompress layers (QuantLinear and
any layer with ``in_features`` and ``dequantize()``, which by the layer contract is exactly the
weight ``forward`` computes with, act-order included),
bitsandbytes 4-bit (NF4/FP4, read through the layer's own forward), and plain
``nn.Linear`` / GPT-2 ``Conv1D`` whose weight differs from the original (mask-pruned models).

The maths is :mod:`hfcompress.algorithms.eora`; the block-by-block calibration that feeds
compensated outputs forward is :mod:`hfcompress.adapters.eora_blocks`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..algorithms.eora import (EIG_REL_FLOOR, activation_eigenbasis, eora_compensation, shrink_to_diagonal,
                               svd_compensation)
from ..algorithms.eora_cv import SVD, choose_shrinkage
from ..api import requantize_
from ..config import ConfigError
from ..modules import is_linear, linear_weight, matches
from ..formats import is_compressed

METHODS = ("eora", "svd")
#: EoRAConfig.shrinkage default (benchmarks/README.md, "EoRA": the SmolLM2-135M sweep it was chosen by)
DEFAULT_SHRINKAGE = 0.5
#: ``EoRAConfig.shrinkage`` value that chooses it per layer by cross-validation (algorithms/eora_cv.py)
CV = "cv"
#: EoRAConfig.window_offset default: EoRA's windows half-way between a quantizer's (benchmarks/README.md, "EoRA")
DEFAULT_WINDOW_OFFSET = 0.5
#: key of the compensation record inside adapter_config.json's ``auto_mapping`` (a dict PEFT keeps)
RECORD_KEY = "hfcompress_compensation"


@dataclass
class EoRAConfig:
    """What to compensate and how. Not a PEFT config: the result is a plain ``LoraConfig`` adapter.

    * ``rank``: LoRA rank per layer (capped at ``min(out, in)`` of each layer).
    * ``method``: ``"eora"`` (eigenspace of the layer inputs) or ``"svd"`` (plain SVD of ΔW, no data).
    * ``target_modules``: module-name patterns (``"q_proj"``, ``"layers.*.mlp"``, regex); ``None`` =
      every compressed layer whose weight differs from the original's, and every float layer with
      weights zeroed by pruning (float layers that differ only by dtype rounding are left alone).
    * ``rank_pattern``: ``{pattern: rank}`` overrides per module (first match wins).
    * ``dataset``: calibration data for ``"eora"``: token ids ``[n, seq]`` (LongTensor), a list of
      1-D token tensors, or a list of strings (then pass ``tokenizer=`` to :func:`compensate`).
    * ``n_samples`` x ``seq_len``: calibration windows cut from ``dataset``; ``batch_size`` per forward.
    * ``window_offset`` in [0, 1): where the windows are cut from text or a token stream: ``window_offset``
      of a spacing past the evenly spaced windows a quantizer calibrated on the same text with the same
      ``n_samples`` and ``seq_len`` fitted on (``hfcompress.calibration.get_calibration_batches``); 0: those
      very windows. The default 0.5 cuts them half-way between, text the quantizer never fitted: GPTQ's
      error on its own calibration windows is smaller than on the rest of the text (0.83x in the median
      layer of SmolLM2-135M at 4 bits), so an EoRA fitted on those windows sees too little error exactly
      where their activations are large. Windows given as a tensor ``[n, seq]`` are used as given.
    * ``eig_rel_floor``: eigenvalues of XᵀX below this fraction of the largest are raised to it.
    * ``shrinkage`` ``t`` in [0, 1]: ``"eora"`` solves on ``(1 - t) XᵀX + t diag(XᵀX)`` instead of ``XᵀX``:
      the input channels' scales are kept, their correlations (which a few calibration windows
      over-fit) shrunk. 0 is the paper's EoRA, 1 weights each input channel by its scale only.
      Chosen on SmolLM2-135M (``benchmarks/eora_shrink.py``). Ignored by ``"svd"``.
      ``"cv"``: chosen per layer from ``cv_grid`` by cross-validation on the calibration windows
      (``cv_folds`` contiguous folds; each candidate fitted on the other folds and scored by the output
      error it leaves on the held-out one; :mod:`hfcompress.algorithms.eora_cv`); ``"svd"`` in the grid
      lets a layer take plain SVD. Not with distributed calibration. On SmolLM2-135M it chose less
      shrinkage (0 or 0.25 in every layer) and measured worse than 0.5 (benchmarks/README.md, "EoRA").
    * ``cv_folds``, ``cv_grid``: used only by ``shrinkage="cv"``.
    """

    rank: int = 32
    method: str = "eora"
    target_modules: list[str] | None = None
    rank_pattern: dict[str, int] | None = None
    dataset: Any = None
    n_samples: int = 32
    seq_len: int = 512
    batch_size: int = 4
    eig_rel_floor: float = EIG_REL_FLOOR
    shrinkage: float | str = DEFAULT_SHRINKAGE
    window_offset: float = DEFAULT_WINDOW_OFFSET
    cv_folds: int = 4
    cv_grid: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, SVD)

    def __post_init__(self):
        def bad(name, what):
            raise ConfigError(f"EoRAConfig.{name}={getattr(self, name)!r}: {what}")

        for name in ("rank", "n_samples", "seq_len", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive int")
        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not all(isinstance(p, str) for p in self.target_modules) or not self.target_modules:
                bad("target_modules", "must be None or a non-empty list of module-name patterns (str)")
            self.target_modules = list(self.target_modules)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                    for k, v in self.rank_pattern.items()):
                bad("rank_pattern", "must be a dict {module-name pattern (str): rank (positive int)}")
        if not (isinstance(self.eig_rel_floor, float) and 0 < self.eig_rel_floor < 1):
            bad("eig_rel_floor", "must be a float in (0, 1)")
        if self.shrinkage != CV and (not isinstance(self.shrinkage, (int, float)) or isinstance(self.shrinkage, bool)
                                     or not 0 <= self.shrinkage <= 1):
            bad("shrinkage", f"must be a number in [0, 1] (0: the paper's EoRA; 1: input-channel scales only) "
                             f"or {CV!r} (chosen per layer by cross-validation)")
        if self.shrinkage != CV:
            self.shrinkage = float(self.shrinkage)
        if (not isinstance(self.window_offset, (int, float)) or isinstance(self.window_offset, bool)
                or not 0 <= self.window_offset < 1):
            bad("window_offset", "must be a number in [0, 1): the fraction of a window spacing past a quantizer's "
                                 "windows (0: the same windows)")
        self.window_offset = float(self.window_offset)
        if not isinstance(self.cv_folds, int) or isinstance(self.cv_folds, bool) or self.cv_folds < 2:
            bad("cv_folds", "must be an int >= 2")
        grid = list(self.cv_grid) if isinstance(self.cv_grid, (list, tuple)) else None
        if not grid or not all(c == SVD or (isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1)
                               for c in grid):
            bad("cv_grid", f"must be a non-empty list of shrinkages in [0, 1] and/or {SVD!r}")
        self.cv_grid = tuple(c if c == SVD else float(c) for c in grid)
        if self.shrinkage == CV and self.cv_folds > self.n_samples:
            bad("cv_folds", f"needs at least one calibration window per fold (n_samples={self.n_samples})")

    def rank_for(self, name: str) -> int:
        for pattern, r in (self.rank_pattern or {}).items():
            if matches(name, [pattern]):
                return r
        return self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("dataset")
        if self.shrinkage != CV:  # only what the solve used (records of fixed shrinkages unchanged)
            d.pop("cv_folds"), d.pop("cv_grid")
        else:
            d["cv_grid"] = list(self.cv_grid)
        return d


# ------------------------------------------------------------------------------------------
# The weight a compressed layer computes with
# ------------------------------------------------------------------------------------------

def is_quantized_layer(module: nn.Module) -> bool:
    """Layers whose stored weight is not a float matrix (merging into them re-quantizes)."""
    return (is_compressed(module) or _has_dequantize(module)
            or getattr(getattr(module, "weight", None), "quant_state", None) is not None)


def compressed_weight(module: nn.Module, name: str = "layer") -> torch.Tensor:
    """The float ``[out, in]`` weight ``module`` really computes with (fp32)."""
    if is_compressed(module):  # any registered format: the weight exactly as its forward computes
        return module.dequantize(torch.float32)
    if _has_dequantize(module):  # any other compressed layer following the hfcompress layer contract
        return module.dequantize().to(torch.float32)
    weight = getattr(module, "weight", None)
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit (NF4 / FP4)
        return _probe_weight(module)
    if type(weight).__name__ == "Int8Params":
        raise TypeError(f"{name}: bitsandbytes 8-bit layers are not supported by compensate(); "
                        "use a 4-bit (NF4/FP4) or hfcompress base")
    if is_linear(module):
        return linear_weight(module).detach().to(torch.float32)
    raise TypeError(f"{name}: {type(module).__name__} is not a linear layer compensate() can read a weight from")


@torch.no_grad()
def _probe_weight(module: nn.Module) -> torch.Tensor:
    """``W [out, in]`` of an opaque linear layer, read through its own forward: ``W = (f(I) - b)ᵀ``.
    Exactly what the layer computes with, whatever its storage (bitsandbytes repacks 4-bit weights
    for its CPU kernel on the first inference call, with bf16 block scales)."""
    weight = module.weight
    k = module.in_features
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    eye = torch.eye(k, dtype=dtype, device=weight.device)  # [K, K]
    y = module(eye).to(torch.float32)  # [K, N] = I Wᵀ + b
    if getattr(module, "bias", None) is not None:
        y = y - module.bias.to(torch.float32)
    return y.t().contiguous()  # [N, K]


def _has_dequantize(module: nn.Module) -> bool:
    return callable(getattr(module, "dequantize", None)) and hasattr(module, "in_features")


def _linear_like(module: nn.Module) -> bool:
    return is_compressed(module) or _has_dequantize(module) or is_linear(module)


def _float_model(original, like: nn.Module) -> nn.Module:
    if isinstance(original, nn.Module):
        return original
    if isinstance(original, str):
        cls = type(like)
        if not hasattr(cls, "from_pretrained"):
            raise TypeError(f"original={original!r} is a path but {cls.__name__} has no from_pretrained; "
                            "pass the float model itself")
        return cls.from_pretrained(original, dtype="auto")  # stored dtype; ΔW is taken in fp32 per layer
    raise TypeError(f"original must be the float model or its directory, got {type(original).__name__}")


class Target(NamedTuple):
    """A layer to compensate: its float counterpart in the original model, its rank, ``(out, in)``."""
    original: nn.Module
    rank: int
    shape: tuple[int, int]


def delta_weight(compressed_layer: nn.Module, original_layer: nn.Module, name: str = "layer") -> torch.Tensor:
    """``ΔW = W - W_c [out, in]`` (fp32, on the compressed layer's device), ``W_c`` exactly as the
    compressed layer computes. Computed when a layer is solved, so only one ΔW is alive at a time."""
    w_c = compressed_weight(compressed_layer, name)
    w = linear_weight(original_layer).detach().to(w_c.device, torch.float32)
    if w.shape != w_c.shape:
        raise ValueError(f"{name}: original weight {tuple(w.shape)} vs compressed {tuple(w_c.shape)}; "
                         "`original` must be the float model the compressed one came from")
    return w - w_c


def _mask_pruned(layer: nn.Module, original_layer: nn.Module) -> bool:
    """A float layer counts as compressed when weights the original has were zeroed (mask pruning);
    a float copy that only differs by dtype rounding (e.g. a bf16 round trip) does not."""
    w, w_c = linear_weight(original_layer).detach(), linear_weight(layer).detach().to(original_layer.weight.device)
    return bool(((w_c == 0) & (w != 0)).any())


def find_targets(compressed: nn.Module, original: nn.Module, config: EoRAConfig) -> dict[str, Target]:
    """``{module name: Target}`` for every layer to compensate: by default every compressed layer
    whose weight differs from the original's, and every float layer with weights zeroed by
    pruning (a float layer that differs only by dtype rounding is left alone)."""
    orig_modules = dict(original.named_modules())
    out: dict[str, Target] = {}
    for name, module in compressed.named_modules():
        if not _linear_like(module):
            continue
        explicit = config.target_modules is not None
        if explicit and not matches(name, config.target_modules):
            continue
        ref = orig_modules.get(name)
        if ref is None or not is_linear(ref):
            if explicit:
                raise ValueError(f"EoRAConfig.target_modules selects {name!r}, which the original model does "
                                 "not have as a linear layer; is `original` the model that was compressed?")
            continue
        delta = delta_weight(module, ref, name)
        if not explicit and not (torch.any(delta != 0) if is_quantized_layer(module) else _mask_pruned(module, ref)):
            continue  # kept in float (at most re-rounded to another dtype): nothing to compensate
        out[name] = Target(ref, min(config.rank_for(name), *delta.shape), tuple(delta.shape))
        del delta
    if not out:
        raise ValueError("compensate: no layer differs from the original model; nothing to compensate "
                         "(is `compressed_model` really compressed, or does target_modules match nothing?)")
    return out


# ------------------------------------------------------------------------------------------
# compensate / merge
# ------------------------------------------------------------------------------------------

def _task_type(model: nn.Module) -> str | None:
    if not hasattr(model, "config"):
        return None  # not a transformers model: PEFT's generic wrapper passes inputs as they come
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    # any other model: PEFT's feature-extraction wrapper forwards input_ids/attention_mask as is, and
    # (unlike task_type=None) keeps the auto_mapping dict that carries the compensation record
    return "FEATURE_EXTRACTION"


def compression_record(model: nn.Module, targets: dict) -> dict:
    """What compression the adapter compensates (written into adapter_config.json)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None:
        comp = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    else:
        mods = [model.get_submodule(n) for n in targets]
        zeros = sum(int((linear_weight(m) == 0).sum()) for m in mods if is_linear(m) and not is_quantized_layer(m))
        total = sum(m.weight.numel() for m in mods if is_linear(m) and not is_quantized_layer(m))
        comp = {"kind": "float weights differing from the original (e.g. mask pruning)",
                "zero_fraction": round(zeros / total, 6) if total else None}
    return {k: v for k, v in comp.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def _name_or_path(model, fallback=None):
    return getattr(getattr(model, "config", None), "_name_or_path", None) or fallback


#: attribute of a PeftModel from :func:`compensate`: the dtype its LoRA weights are saved in
SAVE_DTYPE_ATTR = "_hfcompress_lora_save_dtype"


def compensate(compressed_model: nn.Module, original, config: EoRAConfig | None = None, tokenizer=None,
               adapter_name: str = "default", progress: bool = False, save_dtype: torch.dtype | None = torch.float16):
    """Compensate ``compressed_model`` toward ``original`` with EoRA (or plain SVD); returns a
    ``peft.PeftModel`` wrapping ``compressed_model`` (modified in place: LoRA layers attached).
    ``save_dtype``: the dtype ``save_pretrained`` stores the LoRA weights in (fp16, as the CLI and
    ``added_bits_per_weight_fp16`` count; ``None``: PEFT's own fp32). The fp32 parameters in memory
    are rounded to it, so the model computes exactly what its saved adapter reloads to."""
    from peft import LoraConfig, get_peft_model

    config = config or EoRAConfig()
    if not isinstance(config, EoRAConfig):
        raise TypeError(f"config must be hfcompress.EoRAConfig, got {type(config).__name__}")
    if hasattr(compressed_model, "peft_config"):
        raise ValueError("compressed_model already has PEFT adapters; pass the bare compressed model")
    original_model = _float_model(original, compressed_model)
    targets = find_targets(compressed_model, original_model, config)

    ranks = {n: t.rank for n, t in targets.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {n: r for n, r in ranks.items() if r != r0}
    fan_in_fan_out = any(type(compressed_model.get_submodule(n)).__name__ == "Conv1D" for n in targets)
    lora_config = LoraConfig(
        r=r0, lora_alpha=r0, rank_pattern=dict(pattern), alpha_pattern=dict(pattern), target_modules=sorted(targets),
        lora_dropout=0.0, bias="none", fan_in_fan_out=fan_in_fan_out, task_type=_task_type(compressed_model),
    )  # base_model_name_or_path: PEFT fills in the compressed model, the base this adapter sits on
    record = {"method": config.method, "config": config.to_dict(),
              "original_model": original if isinstance(original, str) else _name_or_path(original),
              "compressed_model": _name_or_path(compressed_model),
              "compression": compression_record(compressed_model, targets),
              "added_bits_per_weight_fp16": added_bits_per_weight(targets, ranks, 16)}
    lora_config.auto_mapping = {"base_model_class": type(compressed_model).__name__,
                                "parent_library": type(compressed_model).__module__, RECORD_KEY: record}
    peft_model = get_peft_model(compressed_model, lora_config, adapter_name=adapter_name)
    peft_model.eval()
    inner = peft_model.base_model.model

    if config.method == "svd":
        for name, t in targets.items():
            layer = inner.get_submodule(name)
            b, a = svd_compensation(delta_weight(layer.get_base_layer(), t.original, name), t.rank)
            set_lora_(layer, adapter_name, b, a)
    else:
        from .eora_blocks import calibration_batches, sequential_compensate_

        if tokenizer is None and not isinstance(config.dataset, (torch.Tensor, list, tuple)):
            tokenizer = _tokenizer_for(original, compressed_model)
        batches = calibration_batches(config, tokenizer)

        last: list = [None, None, None, None]  # (XᵀX, t, shrunk XᵀX, eigenbasis) of the previous layer: q/k/v, gate/up share inputs
        chosen: dict[str, float | str] = {}  # shrinkage="cv": each layer's choice
        cv_cache: list = [None, {}]  # (fold list, correlation bases) of the previous layer

        def solve(name, xtx, fold_xtx=None):
            t = targets[name]
            delta = delta_weight(inner.get_submodule(name).get_base_layer(), t.original, name)
            shrinkage = config.shrinkage
            if shrinkage == CV and fold_xtx is None:  # outside the decoder blocks (e.g. lm_head): no folds
                shrinkage = chosen[name] = DEFAULT_SHRINKAGE
            elif shrinkage == CV:
                if cv_cache[0] is not fold_xtx:
                    cv_cache[:] = [fold_xtx, {}]
                shrinkage = chosen[name] = choose_shrinkage([delta], fold_xtx, [t.rank], config.cv_grid,
                                                            cache=cv_cache[1])[0]
                if shrinkage == SVD:
                    return svd_compensation(delta, t.rank)
            if (last[0] is None or last[1] != shrinkage or last[0].shape != xtx.shape
                    or not torch.equal(last[0], xtx)):
                c = shrink_to_diagonal(xtx, shrinkage)
                last[:] = [xtx, shrinkage, c, activation_eigenbasis(c, config.eig_rel_floor)]
            return eora_compensation(delta, last[2], t.rank, config.eig_rel_floor, basis=last[3])

        sequential_compensate_(inner, sorted(targets), batches, solve, adapter_name, progress=progress,
                               folds=config.cv_folds if config.shrinkage == CV else 0)
        if chosen:  # written into adapter_config.json beside the config
            peft_model.peft_config[adapter_name].auto_mapping[RECORD_KEY]["cv_choices"] = dict(sorted(chosen.items()))
    if save_dtype is not None:
        cast_lora_(peft_model, save_dtype, round_only=True)
        setattr(peft_model, SAVE_DTYPE_ATTR, save_dtype)
    return peft_model


def _tokenizer_for(original, compressed_model):
    """The tokenizer saved beside the original (or compressed) model, or None."""
    from transformers import AutoTokenizer

    for path in (original if isinstance(original, str) else None, _name_or_path(compressed_model)):
        if path:
            try:
                return AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                continue
    return None


@torch.no_grad()
def set_lora_(layer: nn.Module, adapter_name: str, b: torch.Tensor, a: torch.Tensor) -> None:
    """Write ``B [out, r]`` and ``A [r, in]`` into a PEFT LoRA layer (scaling must be 1)."""
    la, lb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if la.shape != a.shape or lb.shape != b.shape:
        raise ValueError(f"LoRA shapes A {tuple(la.shape)} / B {tuple(lb.shape)} do not fit the computed "
                         f"{tuple(a.shape)} / {tuple(b.shape)}")
    if layer.scaling[adapter_name] != 1:
        raise ValueError(f"LoRA scaling is {layer.scaling[adapter_name]}, expected 1 (r = lora_alpha)")
    la.copy_(a.to(la.device, la.dtype))
    lb.copy_(b.to(lb.device, lb.dtype))


def added_bits_per_weight(targets: dict, ranks: dict[str, int], bits: int = 16) -> float:
    """LoRA storage ``bits * r * (out + in)`` over the compensated layers' weight count."""
    added = sum(bits * ranks[n] * sum(t.shape) for n, t in targets.items())
    weights = sum(math.prod(t.shape) for t in targets.values())
    return added / weights


@torch.no_grad()
def cast_lora_(peft_model, dtype: torch.dtype, round_only: bool = False):
    """Store the LoRA weights of ``peft_model`` in ``dtype`` (fp16 before ``save_pretrained`` is
    the storage ``added_bits_per_weight_fp16`` counts; PEFT loads them back into fp32 parameters).
    ``round_only``: round to ``dtype`` but keep each parameter's dtype, i.e. compute with exactly
    what such a save reloads to. Returns ``peft_model``."""
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype).to(p.dtype) if round_only else p.data.to(dtype)
    return peft_model


def merge_compensation(peft_model, requantize: bool = False):
    """Merge the compensation into the base where that is exact (a float base: plain
    ``merge_and_unload``). On a quantized base merging re-quantizes (lossy): refused unless
    ``requantize=True`` (hfcompress layers: RTN on the layer's grid; bitsandbytes: NF4 again)."""
    from peft.tuners.lora import LoraLayer

    quantized = [n for n, m in peft_model.named_modules()
                 if isinstance(m, LoraLayer) and is_quantized_layer(m.get_base_layer())]
    if quantized and not requantize:
        raise ValueError(f"merge_compensation: {len(quantized)} compensated layer(s) have a quantized base "
                         f"(e.g. {quantized[0]}); merging would re-quantize them and lose the compensation. "
                         "Keep the adapter unmerged, merge into the float model, or pass requantize=True.")
    for _, layer in [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]:
        base = layer.get_base_layer()
        if is_compressed(base):  # dequantize + B A, back onto the layer's own grid
            w = base.dequantize(torch.float32)
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    w = w + layer.get_delta_weight(name).to(w.device, torch.float32)
            requantize_(base, w)
        else:
            layer.merge()  # float base: exact; bitsandbytes: peft's own dequantize/merge/re-quantize
    return peft_model.unload()


__all__ = ["EoRAConfig", "cast_lora_", "compensate", "compressed_weight", "merge_compensation", "RECORD_KEY"]

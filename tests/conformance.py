"""The conformance table: every quantization method x every tiny model passes the same battery
(tests/test_conformance.py). A method joins by adding a :class:`MethodSpec` row to ``METHODS``;
its id starts with the method's identifier so ``pytest -k <method>`` selects it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import hfcompress


@dataclass(frozen=True)
class MethodSpec:
    id: str
    make_config: Callable[[], hfcompress.HfCompressConfig]
    #: minimum SQNR (dB) of logits against the float model, per tiny model
    sqnr_min: float
    models: tuple[str, ...] = ("llama", "qwen2", "gpt2", "bert")
    #: extra kwargs for quantize_ (calibration data ...) given the model name and tokenizer-free inputs
    quantize_kwargs: Callable[[str], dict] = field(default=lambda model_name: {})


def _calib_ids():
    from tiny_models import inputs

    return inputs(batch=8, seq=40, seed=7)


METHODS: list[MethodSpec] = [
    MethodSpec("rtn-w4-g32-asym", lambda: hfcompress.RTNConfig(bits=4, group_size=32), sqnr_min=15.0),
    MethodSpec("rtn-w3-g64-sym", lambda: hfcompress.RTNConfig(bits=3, group_size=64, sym=True), sqnr_min=8.0),
    MethodSpec("rtn-w8-perchannel", lambda: hfcompress.RTNConfig(bits=8, group_size=-1, mse_clip=False),
               sqnr_min=35.0),
    MethodSpec("rtn-w2-g16-asym", lambda: hfcompress.RTNConfig(bits=2, group_size=16), sqnr_min=4.0),
    # GPTQ calibrates on token ids (no tokenizer needed); decoder models only (block-by-block runner)
    MethodSpec("gptq-w4-g32-actorder",
               lambda: hfcompress.GPTQConfig(bits=4, group_size=32, dataset=_calib_ids(), n_samples=8, seq_len=32),
               sqnr_min=15.0, models=("llama", "qwen2", "gpt2")),
    MethodSpec("gptq-w3-g32-static-sym",
               lambda: hfcompress.GPTQConfig(bits=3, group_size=32, sym=True, static_groups=True,
                                             dataset=_calib_ids(), n_samples=8, seq_len=32),
               sqnr_min=8.0, models=("llama", "qwen2", "gpt2")),
]

# LoRA targets per tiny model (plain peft LoraConfig on the quantized model)
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value"],
}

"""L4Q (quantization-aware LoRA with learned step sizes) as a PEFT method.

``get_peft_model(model, L4QConfig(bits=3, group_size=64))`` -> train (Trainer, plain loop) ->
:func:`export` writes an int_group checkpoint that ``from_pretrained`` loads into QuantLinear
(no LoRA branch left); its logits equal the trained model's forward exactly.
"""

from __future__ import annotations

from .config import L4QConfig, L4QQuantConfig
from .export import export, l4q_layers, optimizer_groups, quantized_model_
from .layer import L4QLayer, Linear
from .model import L4QModel

from .. import PEFT_METHODS  # noqa: E402

PEFT_METHODS["l4q"] = (L4QConfig, L4QModel, L4QModel.prefix)

__all__ = ["L4QConfig", "L4QLayer", "L4QModel", "L4QQuantConfig", "Linear", "export", "l4q_layers",
           "optimizer_groups", "quantized_model_"]

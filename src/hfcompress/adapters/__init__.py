"""PEFT methods from the papers, in PEFT's own shape (config.py, layer.py, model.py per method).

``PEFT_METHODS`` maps each method's name to ``(config_cls, model_cls, prefix)``;
``import hfcompress`` registers them with PEFT (hfcompress.integrations.peft), after which
``get_peft_model``, ``PeftModel.from_pretrained`` and ``load_adapter`` know them.
"""

from __future__ import annotations

from .compacter import CompacterConfig, CompacterModel
from .mos import MoSConfig, MoSModel

PEFT_METHODS: dict[str, tuple[type, type, str]] = {
    "compacter": (CompacterConfig, CompacterModel, CompacterModel.prefix),
    "mos": (MoSConfig, MoSModel, MoSModel.prefix),
}

__all__ = ["PEFT_METHODS", "CompacterConfig", "CompacterModel", "MoSConfig", "MoSModel"]

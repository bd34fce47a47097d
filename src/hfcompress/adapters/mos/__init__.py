"""MoS (Mixture of Shards) as a PEFT method, with export to a standard LoRA adapter."""

from .config import MoSConfig
from .export import to_lora
from .layer import MoSLayer, MoSLinear
from .model import MoSModel

__all__ = ["MoSConfig", "MoSLayer", "MoSLinear", "MoSModel", "to_lora"]

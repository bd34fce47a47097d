"""Compacter and Compacter++ (``placement="pfeiffer"``) as a PEFT method."""

from .config import CompacterConfig
from .layer import CompacterLayer, CompacterWrapper, phm_weight
from .model import CompacterModel

__all__ = ["CompacterConfig", "CompacterLayer", "CompacterModel", "CompacterWrapper", "phm_weight"]

"""EvoPress (Sieberling et al., 2024): compress a model to a size budget with per-layer bit
widths chosen by evolutionary search.

``config.py`` (EvoPressConfig), ``database.py`` (every layer at every level, built once with
GPTQ or RTN, cached as safetensors), ``fitness.py`` (KL divergence to the float model),
``apply.py`` (budget, the chosen layers swapped in, the per-module format table). The search
itself is ``hfcompress.algorithms.evopress``.
"""

from ..sizes import parse_size
from .config import EvoPressConfig

__all__ = ["EvoPressConfig", "parse_size"]

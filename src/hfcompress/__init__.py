"""hfcompress: compression methods from the papers, native in transformers, PEFT, the Trainer and the Hub.

``import hfcompress`` registers the ``"hfcompress"`` quantization method with transformers
and hfcompress layers and PEFT methods with PEFT (see hfcompress.integrations); nothing
touches a device.
"""

from .adapters import CompacterConfig, MoSConfig, l4q
from .adapters.eora import EoRAConfig, compensate, merge_compensation
from .adapters.l4q import L4QConfig
from .api import dequantize_, quantize_, requantize_
from .config import ConfigError, GPTQConfig, HfCompressConfig, RTNConfig
from .evopress import EvoPressConfig
from .convert import FromGPTQConfig, export_compressed_tensors
from .formats import FormatError, IntGroupSpec
from .kv import GEARCache
from .nn import QuantLinear
from .streaming import quantize

__version__ = "0.1.0"

# The package entry point wires the integrations (which import hfcompress, never the reverse).
from hfcompress.integrations import register_all as _register_all  # noqa: E402

_register_all()

from hfcompress.integrations.peft import merge_and_requantize  # noqa: E402
from hfcompress.integrations.trainer import L4QCallback, LoRAPruneCallback  # noqa: E402

from . import prune  # noqa: E402

def __getattr__(name: str):
    """Config classes of registered algorithms (e.g. a format plug-in's) as ``hfcompress.<ClassName>``."""
    from .config import algorithms

    for cls in algorithms().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'hfcompress' has no attribute {name!r}")


__all__ = [
    "CompacterConfig",
    "ConfigError",
    "EoRAConfig",
    "EvoPressConfig",
    "FormatError",
    "FromGPTQConfig",
    "GEARCache",
    "GPTQConfig",
    "HfCompressConfig",
    "IntGroupSpec",
    "L4QCallback",
    "L4QConfig",
    "LoRAPruneCallback",
    "MoSConfig",
    "QuantLinear",
    "RTNConfig",
    "compensate",
    "dequantize_",
    "export_compressed_tensors",
    "l4q",
    "merge_and_requantize",
    "merge_compensation",
    "prune",
    "quantize",
    "quantize_",
    "requantize_",
]

"""Converters between hfcompress checkpoints and the formats other tools read and write.

- :mod:`.gptq` / :mod:`.from_gptq`: GPTQ checkpoints (AutoGPTQ / GPTQModel) -> int_group, exactly
  (``from_pretrained(gptq_dir, quantization_config=FromGPTQConfig())``, ``hfcompress convert``).
"""

from .from_gptq import FromGPTQConfig
from .gptq import ConversionError

__all__ = ["ConversionError", "FromGPTQConfig"]

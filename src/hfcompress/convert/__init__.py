"""Converters between hfcompress checkpoints and the formats other tools read and write.

- :mod:`.gptq_to_int_group` / :mod:`.from_gptq`: GPTQ checkpoints (AutoGPTQ / GPTQModel) -> int_group, exactly
  (``from_pretrained(gptq_dir, quantization_config=FromGPTQConfig())``, ``hfcompress convert``).
- :mod:`.int_group_to_compressed_tensors`: int_group -> compressed-tensors ``pack-quantized`` (vLLM), exactly
  (``export_compressed_tensors``, ``hfcompress export``).
"""

from .from_gptq import FromGPTQConfig
from .int_group_to_compressed_tensors import export_compressed_tensors
from .gptq_to_int_group import ConversionError

__all__ = ["ConversionError", "FromGPTQConfig", "export_compressed_tensors"]

"""Converters between hfcompress checkpoints and the formats other tools read and write.

- :mod:`.gptq` / :mod:`.from_gptq`: GPTQ checkpoints (AutoGPTQ / GPTQModel) -> int_group, exactly
  (``from_pretrained(gptq_dir, quantization_config=FromGPTQConfig())``, ``hfcompress convert``).
- :mod:`.compressed_tensors`: int_group -> compressed-tensors ``pack-quantized`` (vLLM), exactly
  (``export_compressed_tensors``, ``hfcompress export``).
"""

from .from_gptq import FromGPTQConfig
from .compressed_tensors import export_compressed_tensors
from .gptq import ConversionError

__all__ = ["ConversionError", "FromGPTQConfig", "export_compressed_tensors"]

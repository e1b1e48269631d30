"""tidar: export and deployment toolkit for TiDAR models.

Subpackages (each in its own top-level folder of the repository):
  tidar.runtime  config, hybrid-mask layouts, reference model, KV cache, the draft-verify loop
  tidar.export   checkpoint validation and export (TensorRT-LLM, ONNX, Triton repository)
  tidar.plugins  the hybrid-mask attention kernel and its TensorRT / TensorRT-LLM plugins
  tidar.train    the full-mask training objective and trainer
"""

__version__ = "0.1.0"

"""tidar: export and deployment toolkit for TiDAR models.

Subpackages (each in its own top-level folder of the repository):
  tidar.runtime  config, hybrid-mask layouts, reference model, KV cache, the draft-verify loop
  tidar.export   checkpoint validation and export (TensorRT-LLM, ONNX, Triton repository)
  tidar.plugins  the hybrid-mask attention kernel and its TensorRT / TensorRT-LLM plugins
  tidar.train    the full-mask training objective and trainer
"""

from pathlib import Path

__version__ = "0.1.0"

BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "tidar-stdlib-qwen2"
"""The trained TiDAR checkpoint shipped in models/: every command's default MODEL."""

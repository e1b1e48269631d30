"""Triton Python-backend entry of the `tensorrt_llm` model: the model itself is
tidar.serving.llmapi_model (Triton loads this file and instantiates the `TritonPythonModel` it names)."""

from tidar.serving.llmapi_model import TritonPythonModel  # noqa: F401

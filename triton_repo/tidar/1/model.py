"""Triton Python-backend entry of the `tidar` model: the model itself is tidar.serving.triton_model
(Triton loads this file and instantiates the `TritonPythonModel` it names)."""

from tidar.serving.triton_model import TritonPythonModel  # noqa: F401

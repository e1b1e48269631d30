"""The tensors of a Hugging Face TiDAR checkpoint, checked and read one piece at a time.

Every export step reads the source checkpoint through `CheckpointSource`, never through a
materialised model, so memory holds one tensor (or a chunk of its rows), not the checkpoint:

- opening it checks, from the safetensors headers alone, that the weights are exactly the
  tensors config.json implies (`runtime.checkpoint.check_tensor_names`), each with the right
  shape and a supported float dtype;
- `validate()` then reads every tensor in row chunks and checks it is finite;
- `read(name, rows)` and `row_chunks(name, dtype)` hand out tensors, whole or by rows, to the
  TensorRT-LLM conversion and the ONNX weights writer.

Reads are plain file reads (`safetensors_stream.read_tensor`), not memory maps, so pages read
do not stay in the process's resident memory. Every error is a `CheckpointError` naming the
file and the tensor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from tidar.runtime.checkpoint import (SUPPORTED_WEIGHT_DTYPES, CheckpointError, check_tensor_names,
                                      expected_shapes, weight_files)
from tidar.runtime.config import TiDARConfig
from tidar.runtime.model import TiDARModel

from .safetensors_stream import StoredTensor, read_header, read_tensor

CHUNK_BYTES = 64 << 20
"""Rows read (and converted) at a time by `row_chunks` and `validate`: about 64 MB."""


EMBEDDING = "model.embed_tokens.weight"
"""The HF name of the token embedding."""


def head_weight_source(config: TiDARConfig) -> str:
    """The checkpoint tensor the LM head multiplies by: lm_head.weight, or the embedding when
    embeddings are tied (a tied checkpoint stores no lm_head.weight)."""
    return EMBEDDING if config.tie_word_embeddings else "lm_head.weight"


def model_shapes(config: TiDARConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of every tensor a checkpoint of `config` stores (no tied head)."""
    with torch.device("meta"):
        return expected_shapes(TiDARModel(config))


class CheckpointSource:
    """The checkpoint folder `folder` of `config`, with names, shapes and dtypes checked."""

    def __init__(self, folder: str | Path, config: TiDARConfig):
        self.folder, self.config = Path(folder), config
        self.files = weight_files(self.folder)
        self.shapes = model_shapes(config)
        check_tensor_names(self.folder, self.files, self.shapes, config)
        headers = {path: self._header(path) for path in sorted(set(self.files[name] for name in self.shapes))}
        self.stored: dict[str, StoredTensor] = {}
        for name, shape in self.shapes.items():
            path = self.files[name]
            if name not in headers[path]:
                raise CheckpointError(f"{path}: has no tensor {name!r} although the index says it does")
            stored = headers[path][name]
            if stored.shape != shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {stored.shape}, config.json implies {shape}")
            if stored.dtype not in SUPPORTED_WEIGHT_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {stored.dtype_name}")
            self.stored[name] = stored

    @staticmethod
    def _header(path: Path) -> dict[str, StoredTensor]:
        try:
            return read_header(path)
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None

    @property
    def names(self) -> list[str]:
        """The model's tensor names (HF), in the model's parameter order."""
        return list(self.shapes)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` as stored (or its rows [start, stop) along dim 0)."""
        stored = self.stored[name]
        try:
            return read_tensor(stored, rows)
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{stored.path}: tensor {name!r} cannot be read ({exc})") from None

    def row_chunks(self, name: str, dtype: torch.dtype | None = None,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Tensor `name` as consecutive chunks of rows of about `chunk_bytes` each, in `dtype`
        (default: as stored)."""
        shape = self.shapes[name]
        if not shape:
            yield self.read(name).to(dtype or self.stored[name].dtype)
            return
        row_bytes = max(1, math.prod(shape[1:]) * self.stored[name].dtype.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, shape[0], step):
            chunk = self.read(name, (start, min(start + step, shape[0])))
            yield chunk if dtype is None else chunk.to(dtype)

    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """Raise CheckpointError unless `tensor` (a part of tensor `name`) is finite; checked a
        slice at a time, so the check's temporaries stay small."""
        flat = tensor.reshape(-1)
        step = max(1, CHUNK_BYTES // max(1, flat.element_size()))
        if not all(bool(torch.isfinite(part).all()) for part in flat.split(step)):
            raise CheckpointError(f"{self.stored[name].path}: tensor {name!r} contains NaN or Inf")

    def validate(self) -> None:
        """Read every tensor (a chunk of rows at a time) and check it is finite."""
        for name in self.names:
            for chunk in self.row_chunks(name):
                self.check_finite(name, chunk)

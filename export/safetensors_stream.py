"""Safetensors files written and read one tensor at a time, so memory never holds a checkpoint.

safetensors' own `save_file` takes every tensor at once and copies each to bytes, so a
TensorRT-LLM rank file of a 1.5B model would sit in memory twice. `write_safetensors` takes the
tensors' names, dtypes and shapes up front (the header comes first in the file), then asks for
each tensor in turn and writes its bytes straight to disk; a tensor may also be produced as
consecutive row chunks, so even one large tensor need not be whole in memory.

`read_tensor` reads one tensor (or a range of its rows) with plain file reads into a fresh
buffer. safetensors' `safe_open` memory-maps the file, and every page it touches stays counted
in the process's resident memory until the handle is closed; plain reads leave them in the page
cache only, so streaming a checkpoint costs one tensor of memory, not the checkpoint.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the tensors' bytes back to back, in header order.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor of a file to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


Produced = torch.Tensor | Iterable[torch.Tensor]
"""A tensor, or consecutive chunks of its rows (dim 0) whose concatenation is the tensor."""


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} has no safetensors name")
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_tensor_bytes(handle, tensor: torch.Tensor) -> int:
    """Write `tensor`'s bytes (row-major) to the open binary file `handle`; returns their count."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    data = flat.view(torch.uint8).numpy()  # no copy; torch.uint8 views any dtype, bfloat16 included
    handle.write(memoryview(data))
    return data.nbytes


def write_safetensors(path: str | Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], Produced],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write the safetensors file `path` holding `specs`, in that order, asking `produce(spec)`
    for each tensor only when its turn comes. Raises ValueError naming the tensor whose produced
    dtype or size disagrees with its spec."""
    path = Path(path)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate tensor names")
    with open(path, "wb") as handle:
        handle.write(_header(specs, metadata))
        for spec in specs:
            produced = produce(spec)
            chunks = [produced] if isinstance(produced, torch.Tensor) else produced
            written = 0
            for chunk in chunks:
                if chunk.dtype != spec.dtype:
                    raise ValueError(f"{path}: tensor {spec.name!r} produced as {chunk.dtype}, declared {spec.dtype}")
                written += write_tensor_bytes(handle, chunk)
                del chunk
            if written != spec.nbytes:
                raise ValueError(f"{path}: tensor {spec.name!r} produced {written} bytes, "
                                 f"its shape {spec.shape} needs {spec.nbytes}")
    return path


# ---------------------------------------------------------------- reading
@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype | None  # None: a dtype torch cannot hold (reported by the caller)
    dtype_name: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int


def read_header(path: str | Path) -> dict[str, StoredTensor]:
    """{name: StoredTensor} of the safetensors file `path`; raises ValueError if the header is
    unreadable or a tensor's extent does not fit the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"header length {length} exceeds the file size {size}")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        try:
            begin, end = (start + int(offset) for offset in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
            dtype_name = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name!r}: malformed header entry ({exc})") from None
        if not start <= begin <= end <= size:
            raise ValueError(f"tensor {name!r}: data [{begin}, {end}) lies outside the file of {size} bytes")
        dtype = TORCH_DTYPES.get(dtype_name)
        if dtype is not None and end - begin != TensorSpec(name, dtype, shape).nbytes:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes of data for a {dtype_name} tensor of "
                             f"shape {shape}")
        tensors[name] = StoredTensor(path, name, dtype, dtype_name, shape, begin, end)
    return tensors


def read_tensor(stored: StoredTensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor `stored` (or its rows [start, stop) along dim 0), read into a new buffer."""
    if stored.dtype is None:
        raise ValueError(f"tensor {stored.name!r}: dtype {stored.dtype_name} is not supported")
    shape = list(stored.shape)
    row_bytes = (stored.end - stored.begin) // shape[0] if shape and shape[0] else 0
    begin, count = stored.begin, stored.end - stored.begin
    if rows is not None:
        start, stop = rows
        begin, count = stored.begin + start * row_bytes, (stop - start) * row_bytes
        shape[0] = stop - start
    buffer = torch.empty(count, dtype=torch.uint8)
    with open(stored.path, "rb", buffering=0) as handle:
        handle.seek(begin)
        view, done = memoryview(buffer.numpy()), 0
        while done < count:
            got = handle.readinto(view[done:])
            if not got:
                raise ValueError(f"tensor {stored.name!r}: file ends before its data does")
            done += got
    return buffer.view(stored.dtype).reshape(shape)

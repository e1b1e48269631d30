"""`DeclaredEngine`: a stand-in for a TensorRT engine (ICudaEngine and its IExecutionContext), whose
runtime needs a GPU.

It declares exactly the I/O an exporter declares: the ONNX graph's inputs and outputs for the
ONNX -> TensorRT engine (int64 indices, hidden states in the graph's dtype), or
`trtllm_model.input_specs` / `output_specs` for the TensorRT-LLM engine (int32 indices, hidden
states and K/V in the model dtype). Like TensorRT, it refuses input shapes outside the engine's
optimization profile (set_input_shape returns False) and derives each output's shape from the
input shapes. Unlike TensorRT (whose set_tensor_address takes a bare pointer and checks
nothing), its execute checks that every bound address is a buffer of the declared dtype and
shape, then computes the step with the `run` it was given (the computation the engine was built
from: the plugin ONNX graph, or trtllm_model.py's network), converting to and from the
declared dtypes.
"""

from __future__ import annotations

import torch

from tidar.runtime.backends import engine_backend


class EnumValue:
    """A TensorRT enum value (what `.name` of tensorrt.DataType / TensorIOMode members gives)."""

    def __init__(self, kind: str, name: str):
        self.name = name
        self.kind = kind

    def __repr__(self):
        return f"{self.kind}.{self.name}"


class DeclaredEngine:
    """ICudaEngine + IExecutionContext with declared I/O (see the module docstring).

    `declared`: {name: (is_input, DataType name, dims)}; dims are ints or names of dimensions
    ("batch", "new", "past", "kv" = past + new). `ranges`: {dimension: DimRange} of the profile.
    `run`: {input name: np.ndarray (float32 / int64)} -> {output name: array or tensor}."""

    def __init__(self, declared: dict, ranges: dict, run):
        self.declared, self.ranges, self.run = declared, ranges, run
        self.num_io_tensors = len(declared)
        self.shapes, self.addresses, self.bound = {}, {}, {}
        self.executions = 0

    # ICudaEngine
    def get_tensor_name(self, index):
        return list(self.declared)[index]

    def get_tensor_mode(self, name):
        return EnumValue("TensorIOMode", "INPUT" if self.declared[name][0] else "OUTPUT")

    def get_tensor_dtype(self, name):
        return EnumValue("DataType", self.declared[name][1])

    def create_execution_context(self):
        return self

    # IExecutionContext
    def set_input_shape(self, name, shape) -> bool:
        dims = self.declared[name][2]
        if len(shape) != len(dims):
            return False
        sizes = {}
        for dim, size in zip(dims, shape):
            if isinstance(dim, int):
                if size != dim:
                    return False
            elif not self.ranges[dim].min <= size <= self.ranges[dim].max or sizes.setdefault(dim, size) != size:
                return False
        self.shapes[name] = tuple(shape)
        return True

    def _sizes(self) -> dict:
        sizes = {}
        for name, shape in self.shapes.items():
            sizes.update({dim: size for dim, size in zip(self.declared[name][2], shape) if isinstance(dim, str)})
        sizes["kv"] = sizes["past"] + sizes["new"]
        return sizes

    def get_tensor_shape(self, name):
        if self.declared[name][0]:
            return self.shapes[name]
        sizes = self._sizes()
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.declared[name][2])

    def set_tensor_address(self, name, pointer) -> bool:
        self.addresses[name] = pointer
        return True  # as TensorRT's does for a name of the engine

    def execute_async_v3(self, stream) -> bool:
        assert set(self.addresses) == set(self.declared), "every I/O tensor needs an address"
        for name, (_, dtype, _) in self.declared.items():
            tensor = self.bound[name]
            assert engine_backend.tensor_address(tensor) == self.addresses[name], f"{name}: bound address is not the buffer"
            assert tensor.dtype == engine_backend.TORCH_DTYPES[dtype], \
                f"{name}: a {tensor.dtype} buffer bound to an engine tensor declared {dtype}"
            assert tuple(tensor.shape) == tuple(self.get_tensor_shape(name)), \
                f"{name}: buffer of shape {tuple(tensor.shape)}, engine shape {self.get_tensor_shape(name)}"
            assert tensor.is_contiguous(), f"{name}: not dense"
        feeds = {name: (t.to(torch.int64) if not t.is_floating_point() else t.float()).numpy()
                 for name, t in self.bound.items() if self.declared[name][0]}
        for name, value in self.run(feeds).items():
            self.bound[name].copy_(torch.as_tensor(value))
        self.executions += 1
        return True

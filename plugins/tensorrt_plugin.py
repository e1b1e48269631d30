"""The TensorRT plugin `tidar::hybrid_attention`, through TensorRT's Python plugin API.

`register()` (TensorRT >= 10.9, `import tensorrt.plugin as trtp`; call it once before parsing
the plugin ONNX graph, building, or deserializing an engine) defines three things:
- the op (`@trtp.register`): the inputs and attributes of the ONNX node of
  export/onnx_export.py, checked with contract.py, and the output descriptor (query's shape
  and dtype);
- the ahead-of-time implementation (`@trtp.aot_impl`): the Triton kernel compiled with
  triton.compile for the building GPU, its launch grid and int32 arguments as symbolic
  expressions of the input shapes. TensorRT bakes the PTX into the engine, so a serialized
  engine runs without Python (trtexec, the C++ runtime, Triton Inference Server's TensorRT
  backend);
- a just-in-time fallback (`@trtp.impl`): a Python callback that launches the same kernel
  through the torch launcher (needs torch and triton at run time).

The ONNX parser maps a node to this plugin when its op is `hybrid_attention` and it carries the
string attribute plugin_namespace="tidar"; the int attribute aot=1 selects the ahead-of-time
implementation. The ahead-of-time kernel takes its layout scalars and past lengths from device
memory, so one engine serves every layout and batch.

Everything that does not need TensorRT (dtype names, static shapes, the checks, the launch) is
plain Python here and in contract.py, tested without TensorRT.

No `from __future__ import annotations`: TensorRT reads the annotations of the registered
functions as classes, and `tensorrt.plugin` refuses an `aot_impl` without its return annotation
(tests/test_plugins.py runs `register()` through NVIDIA's own package).

The attributes are declared as one-element numpy arrays (`npt.NDArray[np.int64]`,
`npt.NDArray[np.float64]`), not `int` / `float`: `tensorrt.plugin`'s `create_plugin` turns a
builtin-typed attribute into a value with `int(field.data)` on the one-element array TensorRT
hands it, which numpy >= 2.4 refuses (TypeError: only 0-dimensional arrays can be converted),
whereas an array-typed attribute is passed on with `field.data.astype(dtype)` under every numpy.
int64 / float64 are the plugin field types TensorRT gives builtin int / float, so engines keep
the same serialized fields. `attribute_values` turns them back into Python scalars.

`compiled_kernels()` lists the kernels handed to TensorRT in this process (name, PTX ISA version,
shared memory, tiles, Triton version): what an engine build records in manifest.json.
"""

from typing import Tuple, Union

import numpy as np
import numpy.typing as npt

from . import contract

PLUGIN_NAMESPACE = "tidar"
PLUGIN_NAME = "hybrid_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

# tensorrt.DataType member names -> contract dtype names
DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64"}

_registered = False
_compiled: dict[tuple, dict] = {}


# ---------------------------------------------------------------- plain Python
def scalar_attribute(name: str, value, kind: type):
    """The Python `kind` (int or float) of plugin attribute `name`, which TensorRT passes as a
    one-element numpy array (see the module docstring); a plain scalar is accepted too."""
    values = np.asarray(value).reshape(-1)
    if values.size != 1:
        raise ValueError(f"{PLUGIN_ID}: attribute {name!r} must hold one value, got {values.size}: {values.tolist()}")
    scalar = values[0].item()
    if kind is int and (isinstance(scalar, float) and not scalar.is_integer()):
        raise ValueError(f"{PLUGIN_ID}: attribute {name!r} must be an integer, got {scalar!r}")
    return kind(scalar)


def attribute_values(num_heads, num_kv_heads, head_dim, scale) -> tuple[int, int, int, float]:
    """(num_heads, num_kv_heads, head_dim, scale) as Python scalars from TensorRT's attributes."""
    return (scalar_attribute("num_heads", num_heads, int), scalar_attribute("num_kv_heads", num_kv_heads, int),
            scalar_attribute("head_dim", head_dim, int), scalar_attribute("scale", scale, float))


def dtype_name(trt_dtype) -> str:
    """contract.py's name of a tensorrt.DataType (its enum member name, e.g. HALF -> float16)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in DTYPE_NAMES:
        raise ValueError(f"tensorrt dtype {name} is not supported by {PLUGIN_ID}; "
                         f"expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def static_shape(shape_expr) -> tuple:
    """A TensorRT shape expression as a tuple of ints, None where the size is only known at run
    time (or not at all, as when TensorRT asks for output dtypes)."""
    dims = []
    for dim in shape_expr:
        if getattr(dim, "is_fake", False) or not dim.is_constant:
            dims.append(None)
        else:
            value = dim.constant_value
            dims.append(int(value() if callable(value) else value))
    return tuple(dims)


def check_descriptors(shapes: dict, dtypes: dict, num_heads: int, num_kv_heads: int, head_dim: int,
                      scale: float) -> str:
    """All checks of the op on static shapes and dtype names; returns the output dtype."""
    contract.check_attributes(num_heads, num_kv_heads, head_dim, scale)
    contract.check_shapes(shapes, num_heads, num_kv_heads, head_dim)
    return contract.check_dtypes(dtypes)


def index_dtype(dtypes: dict) -> str:
    """The one integer dtype of past_lens and the layout scalars (the compiled kernel takes one)."""
    names = {dtypes[name] for name in ("past_lens", *contract.LAYOUT_SCALARS)}
    if len(names) != 1:
        raise ValueError(f"past_lens and the layout scalars must share one integer dtype, got "
                         f"{', '.join(f'{name}={dtypes[name]}' for name in ('past_lens', *contract.LAYOUT_SCALARS))}")
    return names.pop()


def aot_launch(batch, num_new, kv_len, num_heads: int, num_kv_heads: int, head_dim: int, block_m: int,
               num_warps: int) -> dict:
    """Launch of the ahead-of-time kernel: grid, threads per program and the int32 arguments,
    for sizes that are ints or TensorRT's symbolic expressions."""
    grid_x, grid_y, _ = contract.launch_grid(batch, num_heads, num_new, block_m)
    return {"grid_x": grid_x, "grid_y": grid_y, "block_x": num_warps * 32,
            "int_args": contract.contiguous_int_args(num_new, kv_len, num_heads, num_kv_heads, head_dim)}


def compiled_kernels() -> list[dict]:
    """The kernels `aot_impl` compiled in this process (for the manifest)."""
    return list(_compiled.values())


# ---------------------------------------------------------------- registration
def _dtypes(descs) -> dict:
    return {name: dtype_name(desc.dtype) for name, desc in zip(contract.INPUTS, descs)}


def _descriptors(descs) -> tuple[dict, dict]:
    named = dict(zip(contract.INPUTS, descs))
    return {name: static_shape(desc.shape_expr) for name, desc in named.items()}, _dtypes(descs)


def register() -> None:
    """Register `tidar::hybrid_attention` with TensorRT (idempotent). Raises RuntimeError naming
    what is missing (TensorRT < 10.9 has no ahead-of-time plugins) or what TensorRT refused."""
    global _registered
    if _registered:
        return
    try:
        import tensorrt.plugin as trtp
    except ImportError as error:
        raise RuntimeError(f"registering {PLUGIN_ID} needs the `tensorrt` package (>= 10.9, with its Python plugin "
                           f"API tensorrt.plugin): {error}") from error
    if not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"registering {PLUGIN_ID} needs TensorRT >= 10.9 (tensorrt.plugin.aot_impl, ahead-of-time "
                           "plugins); this TensorRT has none")
    try:
        _define(trtp)
    except ValueError as error:
        if "already has a defintion" in str(error) or "already has a definition" in str(error):
            _registered = True  # defined by an earlier call in this process
            return
        raise RuntimeError(f"TensorRT refused to register {PLUGIN_ID}: {error}") from error
    _registered = True


def _define(trtp) -> None:
    """The three definitions of the module docstring, through `tensorrt.plugin`."""
    Desc = trtp.TensorDesc
    Int, Float = npt.NDArray[np.int64], npt.NDArray[np.float64]  # see the module docstring

    @trtp.register(PLUGIN_ID)
    def describe(query: Desc, key: Desc, value: Desc, past_lens: Desc, causal_len: Desc, num_blocks: Desc,
                 block_len: Desc, first_visible: Desc, visible_stride: Desc,
                 num_heads: Int, num_kv_heads: Int, head_dim: Int, scale: Float) -> Desc:
        num_heads, num_kv_heads, head_dim, scale = attribute_values(num_heads, num_kv_heads, head_dim, scale)
        shapes, dtypes = _descriptors((query, key, value, past_lens, causal_len, num_blocks, block_len,
                                       first_visible, visible_stride))
        check_descriptors(shapes, dtypes, num_heads, num_kv_heads, head_dim, scale)
        return query.like()

    @trtp.aot_impl(PLUGIN_ID)
    def compile_ahead(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride,
                      num_heads, num_kv_heads, head_dim, scale, outputs, tactic
                      ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        import triton

        from .hybrid_attention import aot_kernel

        num_heads, num_kv_heads, head_dim, scale = attribute_values(num_heads, num_kv_heads, head_dim, scale)
        dtypes = _dtypes((query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible,
                          visible_stride))
        kernel = aot_kernel(dtypes["query"], index_dtype(dtypes), head_dim, scale)
        _compiled[(dtypes["query"], index_dtype(dtypes), head_dim)] = {
            "name": kernel.name, "dtype": dtypes["query"], "head_dim": head_dim, "ptx_version": kernel.ptx_version,
            "shared_bytes": kernel.shared, "block_m": kernel.config.block_m, "block_n": kernel.config.block_n,
            "num_warps": kernel.num_warps, "num_stages": kernel.config.num_stages, "triton": triton.__version__}
        q, k = query.shape_expr, key.shape_expr
        launch = aot_launch(q[0], q[2], k[2], num_heads, num_kv_heads, head_dim, kernel.config.block_m,
                            kernel.num_warps)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.block_x = launch["grid_x"], launch["grid_y"], launch["block_x"]
        params.shared_mem = kernel.shared
        int_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(arg) for arg in launch["int_args"]])
        return kernel.name, kernel.ptx, params, int_args

    @trtp.impl(PLUGIN_ID)
    def run(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride,
            scale, outputs, stream):
        import torch

        from .hybrid_attention import hybrid_attention, tensor_from_pointer

        def as_torch(tensor):
            return tensor_from_pointer(tensor.data_ptr, tuple(tensor.shape), dtype_name(tensor.dtype))

        scale = scalar_attribute("scale", scale, float)
        inputs = [as_torch(t) for t in (query, key, value, past_lens, causal_len, num_blocks, block_len,
                                        first_visible, visible_stride)]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            hybrid_attention(*inputs, scale=scale, out=as_torch(outputs[0]))

"""NVIDIA's real `tensorrt.plugin` package over a stand-in for TensorRT's compiled module.

`tensorrt.plugin` is pure Python and ships in the `tensorrt-cu12-bindings` wheel (as
`tensorrt_bindings/plugin`); only the compiled module `tensorrt` underneath it needs TensorRT's
libraries and a GPU. `install()` puts a small pure-Python `tensorrt` module in sys.modules, with
just the classes and enums the plugin package touches, then imports the wheel's own plugin
package as `tensorrt.plugin`. Everything the project's `register()` meets is therefore NVIDIA's
code: the decorators, the signature and annotation validators, the plugin creator and the AOT
plugin class. `build_aot(...)` then makes the calls TensorRT's builder makes on an ahead-of-time
quick plugin, in its order (create_plugin(STRICT_AOT) with the ONNX node's fields,
get_output_data_types, get_output_shapes, get_launch_params, get_kernel), with dimension
expressions that TensorRT would evaluate at run time evaluated here for given sizes.

Run it in a fresh interpreter (a subprocess): it replaces sys.modules["tensorrt"].
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

PLUGIN_PACKAGE = "tensorrt_bindings"  # where the tensorrt-cu12-bindings wheel keeps `plugin/`


# ---------------------------------------------------------------- dimension expressions
class IDimensionExpr:
    """A TensorRT dimension expression: a build-time constant or a function of the run-time sizes."""

    def __init__(self, evaluate, constant: int | None = None):
        self.evaluate, self.constant = evaluate, constant

    def is_constant(self) -> bool:
        return self.constant is not None

    def get_constant_value(self) -> int:
        return self.constant

    def is_size_tensor(self) -> bool:
        return False


class DimensionOperation(enum.Enum):
    SUM, PROD, MAX, MIN, SUB, EQUAL, LESS, FLOOR_DIV, CEIL_DIV = range(9)


_OPERATIONS = {DimensionOperation.SUM: lambda a, b: a + b, DimensionOperation.PROD: lambda a, b: a * b,
               DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: lambda a, b: a - b,
               DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
               DimensionOperation.FLOOR_DIV: lambda a, b: a // b, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(lambda sizes: value, int(value))

    def operation(self, op, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        apply = _OPERATIONS[op]
        if first.is_constant() and second.is_constant():
            return self.constant(apply(first.constant, second.constant))
        return IDimensionExpr(lambda sizes: apply(first.evaluate(sizes), second.evaluate(sizes)))


def symbol(name: str) -> IDimensionExpr:
    """A run-time size (batch, new tokens, ...)."""
    return IDimensionExpr(lambda sizes: sizes[name])


# ---------------------------------------------------------------- the compiled module's surface
class DataType(enum.Enum):
    FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64, INT4, FP4, E8M0 = range(12)


def _enum(name, *members):
    return enum.Enum(name, list(members))


class _Base:
    def __init__(self, *args, **kwargs):
        pass


class PluginField:
    def __init__(self, name="", data=None, type=None):
        self.name, self.data, self.type = name, data, type


class PluginFieldCollection(list):
    pass


class Dims(tuple):
    MAX_DIMS = 8


class DimsExprs(list):
    def __init__(self, length=0):
        super().__init__([None] * length)


class PluginTensorDesc:
    def __init__(self, type=None, format=None, dims=(), scale=1.0):
        self.type, self.format, self.dims, self.scale = type, format, Dims(dims), scale


class DynamicPluginTensorDesc:
    def __init__(self, desc: PluginTensorDesc, min=(), opt=(), max=()):
        self.desc, self.min, self.opt, self.max = desc, Dims(min), Dims(opt), Dims(max)


class _Registry:
    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, version, namespace))


class Logger:
    WARNING, INFO, ERROR, VERBOSE = range(4)

    def __init__(self, *args):
        pass

    def log(self, severity, message):
        pass


def make_module() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__path__ = []  # a package, so `tensorrt.plugin` can be a submodule
    trt.__version__ = "stand-in"
    registry = _Registry()
    trt.DataType = DataType
    trt.float32, trt.float16, trt.bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
    trt.int32, trt.int64, trt.int8, trt.bool = DataType.INT32, DataType.INT64, DataType.INT8, DataType.BOOL
    trt.nptype = lambda dtype: {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
                                DataType.INT64: np.int64, DataType.INT8: np.int8, DataType.BOOL: np.bool_}[dtype]
    trt.TensorFormat = _enum("TensorFormat", "LINEAR", "CHW2", "HWC8", "CHW4", "CHW16", "CHW32")
    trt.PluginFieldType = _enum("PluginFieldType", "FLOAT16", "FLOAT32", "FLOAT64", "INT8", "INT16", "INT32",
                                "CHAR", "DIMS", "UNKNOWN", "BF16", "INT64", "FP8", "INT4", "FP4")
    trt.TensorRTPhase = _enum("TensorRTPhase", "BUILD", "RUNTIME")
    trt.QuickPluginCreationRequest = _enum("QuickPluginCreationRequest", "UNKNOWN", "PREFER_JIT", "PREFER_AOT",
                                           "STRICT_JIT", "STRICT_AOT")
    trt.PluginArgType = _enum("PluginArgType", "INT")
    trt.PluginArgDataType = _enum("PluginArgDataType", "INT8", "INT16", "INT32")
    trt.DimensionOperation = DimensionOperation
    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ISymExpr", "ITensor"):
        setattr(trt, name, type(name, (_Base,), {}))
    trt.IDimensionExpr, trt.IExprBuilder = IDimensionExpr, IExprBuilder
    trt.PluginField, trt.PluginFieldCollection = PluginField, PluginFieldCollection
    trt.Dims, trt.DimsExprs = Dims, DimsExprs
    trt.PluginTensorDesc, trt.DynamicPluginTensorDesc = PluginTensorDesc, DynamicPluginTensorDesc
    trt.Logger = Logger
    trt.get_plugin_registry = lambda: registry
    return trt


def install():
    """sys.modules["tensorrt"] = the stand-in, with NVIDIA's plugin package as tensorrt.plugin;
    returns the plugin package."""
    spec = importlib.util.find_spec(PLUGIN_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{PLUGIN_PACKAGE} (the tensorrt-cu12-bindings wheel) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "plugin"
    trt = make_module()
    sys.modules["tensorrt"] = trt
    plugin_spec = importlib.util.spec_from_file_location("tensorrt.plugin", folder / "__init__.py",
                                                         submodule_search_locations=[str(folder)])
    plugin = importlib.util.module_from_spec(plugin_spec)
    sys.modules["tensorrt.plugin"] = plugin
    trt.plugin = plugin
    plugin_spec.loader.exec_module(plugin)
    return plugin


# ---------------------------------------------------------------- the builder's calls
class _LaunchParams:
    pass


class _SymExprSetter:
    def __init__(self):
        self.nbSymExprs, self.exprs = 0, {}

    def __setitem__(self, index, value):
        self.exprs[index] = value


def build_aot(plugin_id: str, attributes: dict, input_dtypes: list, input_dims: list, sizes: dict) -> dict:
    """Build one ahead-of-time quick plugin as TensorRT's builder does. `input_dims`: per input, a
    tuple of ints (static) or size names (dynamic); `sizes`: the run-time value of each name.
    Returns {output_dtypes, output_shape (evaluated), launch (grid/block/shared evaluated),
    extra_args (evaluated, in order), kernel_name, ptx}."""
    trt = sys.modules["tensorrt"]
    namespace, name = plugin_id.split("::")
    creator = trt.get_plugin_registry().get_creator(name, "1", namespace)
    fields = PluginFieldCollection()
    for field in creator.field_names:  # the ONNX parser fills the creator's fields from the node
        value = attributes[field.name]
        dtype = {"INT64": np.int64, "FLOAT64": np.float64, "INT32": np.int32, "FLOAT32": np.float32}[field.type.name]
        fields.append(PluginField(field.name, np.array([value], dtype=dtype), field.type))
    plugin = creator.create_plugin(name, namespace, fields, trt.TensorRTPhase.BUILD,
                                   trt.QuickPluginCreationRequest.STRICT_AOT)
    plugin.set_tactic(0)
    output_dtypes = plugin.get_output_data_types(input_dtypes, [len(d) for d in input_dims])
    builder = IExprBuilder()
    exprs = [[builder.constant(d) if isinstance(d, int) else symbol(d) for d in dims] for dims in input_dims]
    inputs = [DimsExprs_(e) for e in exprs]
    outputs = plugin.get_output_shapes(inputs, [], builder)
    concrete = [tuple(d if isinstance(d, int) else sizes[d] for d in dims) for dims in input_dims]
    output_shape = tuple(e.evaluate(sizes) for e in outputs[0])
    in_out = [DynamicPluginTensorDesc(PluginTensorDesc(t, trt.TensorFormat.LINEAR, shape))
              for t, shape in zip(input_dtypes, concrete)]
    in_out += [DynamicPluginTensorDesc(PluginTensorDesc(t, trt.TensorFormat.LINEAR, output_shape))
               for t in output_dtypes]
    launch, setter = _LaunchParams(), _SymExprSetter()
    plugin.get_launch_params(inputs, in_out, len(input_dtypes), launch, setter, builder)
    kernel_name, ptx = plugin.get_kernel([d.desc for d in in_out[:len(input_dtypes)]],
                                         [d.desc for d in in_out[len(input_dtypes):]])
    evaluated = {key: getattr(launch, key).expr.evaluate(sizes)
                 for key in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")}
    extra = [setter.exprs[i] for i in range(setter.nbSymExprs)]
    assert all(e.dtype == trt.PluginArgDataType.INT32 for e in extra)
    return {"output_dtypes": [t.name for t in output_dtypes], "output_shape": output_shape, "launch": evaluated,
            "extra_args": [e.expr.evaluate(sizes) for e in extra], "kernel_name": kernel_name,
            "ptx": ptx.decode() if isinstance(ptx, bytes) else ptx}


def DimsExprs_(exprs) -> DimsExprs:
    found = DimsExprs(len(exprs))
    for i, expr in enumerate(exprs):
        found[i] = expr
    return found

"""The plugin front ends without their vendors' packages: contract.py (attributes, shapes, dtypes,
launch), the plain-Python parts of tensorrt_plugin.py and trtllm_plugin.py, the ahead-of-time
compilation of the kernel to PTX (Triton's own compiler, no GPU needed), and the GPU benchmark
script's command line. Registration with TensorRT / TensorRT-LLM runs where those packages are
installed and is skipped (with the reason) elsewhere.

This module never imports plugins/hybrid_attention.py in-process (test_kernel.py decides how
triton is imported there); what needs it runs in a subprocess or is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tidar.plugins import contract, tensorrt_plugin, trtllm_plugin
from tidar.runtime.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRTLLM = trtllm_plugin.PluginBase is not None


def shapes(batch=2, heads=12, kv_heads=2, new=20, kv_len=532, dim=128) -> dict:
    return {"query": (batch, heads, new, dim), "key": (batch, kv_heads, kv_len, dim),
            "value": (batch, kv_heads, kv_len, dim), "past_lens": (batch,),
            **{name: () for name in contract.LAYOUT_SCALARS}}


# ---------------------------------------------------------------- attributes
@pytest.mark.parametrize("attributes", [(12, 2, 128, 128 ** -0.5), (32, 8, 128, 0.1), (4, 4, 64, 1), (8, 1, 256, 2.0)])
def test_valid_attributes(attributes):
    contract.check_attributes(*attributes)


@pytest.mark.parametrize("attributes,message", [
    ((12, 5, 128, 0.1), "num_heads=12 is not a multiple of num_kv_heads=5"),
    ((0, 1, 128, 0.1), "num_heads must be a positive int, got 0"),
    ((12, 2, 128.0, 0.1), "head_dim must be a positive int, got 128.0"),
    ((12, True, 128, 0.1), "num_kv_heads must be a positive int, got True"),
    ((12, 2, 512, 0.1), "head_dim=512 is larger than the kernel supports"),
    ((12, 2, 128, 0.0), "scale must be a finite number > 0, got 0.0"),
    ((12, 2, 128, -1.0), "scale must be a finite number > 0, got -1.0"),
    ((12, 2, 128, float("nan")), "scale must be a finite number > 0, got nan"),
])
def test_bad_attributes(attributes, message):
    with pytest.raises(ValueError, match=message):
        contract.check_attributes(*attributes)


def test_default_scale():
    assert contract.default_scale(128) == pytest.approx(128 ** -0.5)


# ---------------------------------------------------------------- shapes and dtypes
def test_output_shape_is_the_query_shape():
    assert contract.check_shapes(shapes(), 12, 2, 128) == (2, 12, 20, 128)
    assert contract.check_shapes(shapes()) == (2, 12, 20, 128)  # attributes optional


def test_unknown_dimensions_are_not_checked():
    dynamic = {**shapes(), "query": (None, 12, None, 128), "key": (None, 2, None, 128),
               "value": (None, 2, None, 128), "past_lens": (None,)}
    assert contract.check_shapes(dynamic, 12, 2, 128) == (None, 12, None, 128)
    unknown = {name: (None,) * len(shape) for name, shape in shapes().items()}  # ranks only
    assert contract.check_shapes(unknown, 12, 2, 128) == (None,) * 4


@pytest.mark.parametrize("change,attributes,message", [
    ({"query": (2, 12, 20)}, {}, r"query has shape \(2, 12, 20\); expected \[batch, num_heads, new, head_dim\]"),
    ({"key": (2, 2, 532)}, {}, r"key has shape \(2, 2, 532\)"),
    ({"past_lens": (2, 1)}, {}, r"past_lens has shape \(2, 1\); expected \[batch\]"),
    ({"causal_len": (1,)}, {}, r"causal_len has shape \(1,\); expected a scalar"),
    ({"query": (2, 12, 20, 64)}, dict(head_dim=128), "query has head_dim=64 .*expected head_dim=128"),
    ({"query": (2, 16, 20, 128)}, dict(num_heads=12), "query has num_heads=16 .*expected num_heads=12"),
    ({"key": (2, 4, 532, 128), "value": (2, 4, 532, 128)}, dict(num_kv_heads=2), "key has num_kv_heads=4"),
    ({"key": (3, 2, 532, 128)}, {}, "key has batch=3"),
    ({"value": (2, 2, 531, 128)}, {}, "value has kv_len=531"),
    ({"value": (2, 2, 532, 64)}, {}, "value has head_dim=64"),
    ({"past_lens": (1,)}, {}, "past_lens has batch=1"),
    ({"key": (2, 5, 532, 128), "value": (2, 5, 532, 128)}, {}, "query has 12 heads, not a multiple of the 5"),
    ({"query": (2, 12, 20, 512), "key": (2, 2, 532, 512), "value": (2, 2, 532, 512)}, {}, "head_dim=512"),
])
def test_bad_shapes_name_the_tensor(change, attributes, message):
    with pytest.raises(ValueError, match=message):
        contract.check_shapes({**shapes(), **change}, **attributes)


def test_dtype_rules():
    index = {name: "int64" for name in ("past_lens", *contract.LAYOUT_SCALARS)}
    for dtype in contract.ACTIVATION_DTYPES:
        assert contract.check_dtypes({"query": dtype, "key": dtype, "value": dtype, **index}) == dtype
    assert contract.check_dtypes({"query": "float16", "key": "float16", "value": "float16", "past_lens": "int32"}) \
        == "float16"
    bad = [({"query": "float64"}, "query has dtype float64"), ({"key": "bfloat16"}, "key has dtype bfloat16"),
           ({"value": "float32"}, "value has dtype float32; expected float16"),
           ({"past_lens": "float32"}, "past_lens has dtype float32"),
           ({"block_len": "int8"}, "block_len has dtype int8")]
    for change, message in bad:
        dtypes = {"query": "float16", "key": "float16", "value": "float16", **index, **change}
        with pytest.raises(ValueError, match=message):
            contract.check_dtypes(dtypes)


# ---------------------------------------------------------------- launch
@pytest.mark.parametrize("head_dim,dtype,num_new,expected", [
    (128, "bfloat16", None, (64, 64, 128)),
    (128, "float16", 272, (64, 64, 128)),
    (64, "float16", 20, (32, 64, 64)),
    (128, "bfloat16", 1, (16, 64, 128)),
    (128, "float32", None, (32, 32, 128)),
    (80, "float16", None, (64, 64, 128)),
    (8, "float32", 3, (16, 32, 16)),
    (256, "bfloat16", None, (32, 32, 256)),
])
def test_launch_config(head_dim, dtype, num_new, expected):
    config = contract.launch_config(head_dim, dtype, num_new=num_new)
    assert (config.block_m, config.block_n, config.block_d) == expected
    assert (config.num_warps, config.num_stages) == (4, 1 if dtype == "float32" else 2)


def test_launch_config_overrides_and_errors():
    config = contract.launch_config(64, "float16", block_m=16, block_n=32)
    assert (config.block_m, config.block_n) == (16, 32)
    with pytest.raises(ValueError, match="block_n=24 must be a power of two >= 16"):
        contract.launch_config(64, "float16", block_n=24)
    with pytest.raises(ValueError, match="dtype int8 is not one of"):
        contract.launch_config(64, "int8")


def test_launch_grid():
    assert contract.launch_grid(8, 12, 272, 64) == (5, 96, 1)
    assert contract.launch_grid(1, 32, 20, 32) == (1, 32, 1)
    assert contract.launch_grid(2, 4, 1, 16) == (1, 8, 1)


def test_contiguous_int_args_are_the_strides_of_dense_tensors():
    batch, heads, kv_heads, new, kv_len, dim = 3, 12, 2, 20, 99, 128
    q, k = torch.empty(batch, heads, new, dim), torch.empty(batch, kv_heads, kv_len, dim)
    args = dict(zip(contract.KERNEL_INT_ARGS, contract.contiguous_int_args(new, kv_len, heads, kv_heads, dim)))
    assert (args["num_new"], args["kv_len"], args["num_heads"], args["kv_group"]) == (new, kv_len, heads, 6)
    for prefix, tensor, token_axis in (("q", q, "m"), ("k", k, "n"), ("v", k, "n"), ("o", q, "m")):
        strides = tuple(args[f"stride_{prefix}{axis}"] for axis in ("b", "h", token_axis))
        assert strides == tensor.stride()[:3], prefix


class Symbolic:
    """Stands in for TensorRT's symbolic sizes: +, -, *, // with an int on the right, nothing else."""

    def __init__(self, text: str):
        self.text = text

    def _op(self, sign: str, other) -> "Symbolic":
        other = other.text if isinstance(other, Symbolic) else str(other)
        return Symbolic(f"({self.text} {sign} {other})")

    def __add__(self, other):
        return self._op("+", other)

    def __sub__(self, other):
        return self._op("-", other)

    def __mul__(self, other):
        return self._op("*", other)

    def __floordiv__(self, other):
        return self._op("//", other)


def test_launch_helpers_take_symbolic_sizes():
    grid = contract.launch_grid(Symbolic("B"), 12, Symbolic("Q"), 64)
    assert (grid[0].text, grid[1].text, grid[2]) == ("((Q + 63) // 64)", "(B * 12)", 1)
    args = contract.contiguous_int_args(Symbolic("Q"), Symbolic("S"), 12, 2, 128)
    texts = [a.text if isinstance(a, Symbolic) else a for a in args]
    assert texts[:7] == ["Q", "S", 12, 6, "(Q * 1536)", "(Q * 128)", 128]
    assert texts[7:10] == ["(S * 256)", "(S * 128)", 128]
    launch = tensorrt_plugin.aot_launch(Symbolic("B"), Symbolic("Q"), Symbolic("S"), 12, 2, 128, 64, 4)
    assert (launch["grid_x"].text, launch["grid_y"].text, launch["block_x"]) == ("((Q + 63) // 64)", "(B * 12)", 128)
    assert len(launch["int_args"]) == len(contract.KERNEL_INT_ARGS)


# ---------------------------------------------------------------- tensorrt_plugin.py without TensorRT
def test_tensorrt_dtype_names():
    assert tensorrt_plugin.dtype_name(SimpleNamespace(name="HALF")) == "float16"
    assert tensorrt_plugin.dtype_name(SimpleNamespace(name="BF16")) == "bfloat16"
    assert tensorrt_plugin.dtype_name("DataType.INT64") == "int64"
    with pytest.raises(ValueError, match="tensorrt dtype DOUBLE is not supported by tidar::hybrid_attention"):
        tensorrt_plugin.dtype_name(SimpleNamespace(name="DOUBLE"))


def test_tensorrt_static_shape():
    fake = SimpleNamespace(is_fake=True)
    dynamic = SimpleNamespace(is_fake=False, is_constant=False)
    constant = SimpleNamespace(is_fake=False, is_constant=True, constant_value=lambda: 12)
    as_property = SimpleNamespace(is_constant=True, constant_value=128)
    assert tensorrt_plugin.static_shape([dynamic, constant, fake, as_property]) == (None, 12, None, 128)


def test_tensorrt_checks_and_index_dtype():
    index = {name: "int64" for name in ("past_lens", *contract.LAYOUT_SCALARS)}
    dtypes = {"query": "bfloat16", "key": "bfloat16", "value": "bfloat16", **index}
    assert tensorrt_plugin.check_descriptors(shapes(), dtypes, 12, 2, 128, 0.088) == "bfloat16"
    with pytest.raises(ValueError, match="query has num_heads=12"):
        tensorrt_plugin.check_descriptors(shapes(), dtypes, 32, 8, 128, 0.088)
    assert tensorrt_plugin.index_dtype(dtypes) == "int64"
    with pytest.raises(ValueError, match="must share one integer dtype, got past_lens=int32, causal_len=int64"):
        tensorrt_plugin.index_dtype({**dtypes, "past_lens": "int32"})


def test_tensorrt_aot_launch_with_ints():
    launch = tensorrt_plugin.aot_launch(8, 272, 8464, 32, 8, 128, 64, 4)
    assert (launch["grid_x"], launch["grid_y"], launch["block_x"]) == (5, 256, 128)
    assert launch["int_args"] == contract.contiguous_int_args(272, 8464, 32, 8, 128)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the registration test below runs instead")
def test_tensorrt_register_without_tensorrt_is_a_clear_error():
    with pytest.raises(RuntimeError, match="registering tidar::hybrid_attention needs the `tensorrt` package"):
        tensorrt_plugin.register()


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package (not installable on this machine)")
def test_tensorrt_register():
    import tensorrt.plugin as trtp

    tensorrt_plugin.register()
    tensorrt_plugin.register()  # idempotent
    assert hasattr(trtp.op.tidar, "hybrid_attention")


# ---------------------------------------------------------------- trtllm_plugin.py without TensorRT-LLM
@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed: the registration test below runs instead")
def test_trtllm_plugin_without_tensorrt_llm_is_a_clear_error():
    with pytest.raises(RuntimeError, match="TiDARHybridAttention plugin needs tensorrt_llm 1.2.x"):
        trtllm_plugin.require()
    symbolic = [object()] * 9  # stands in for tensorrt_llm.Tensor inputs
    with pytest.raises(RuntimeError, match="needs tensorrt_llm"):
        trtllm_plugin.hybrid_attention_trtllm(*symbolic, num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)


def test_trtllm_eager_call_checks_the_attributes_against_the_inputs():
    layout = Layout.decode(2)
    q, k = torch.zeros(1, 4, layout.num_new, 16), torch.zeros(1, 2, layout.num_new + 3, 16)
    inputs = (q, k, k, torch.tensor([3]), *(torch.tensor(v) for v in layout.kernel_scalars().values()))
    with pytest.raises(ValueError, match="query has num_heads=4 .*expected num_heads=8"):
        trtllm_plugin.hybrid_attention_trtllm(*inputs, num_heads=8, num_kv_heads=2, head_dim=16, scale=0.25)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        trtllm_plugin.hybrid_attention_trtllm(*inputs, num_heads=4, num_kv_heads=2, head_dim=16, scale=0.0)


@pytest.mark.skipif(not HAS_TRTLLM, reason="needs tensorrt_llm 1.2.x (not installable on this machine)")
def test_trtllm_plugin_class():
    plugin_class = trtllm_plugin.require()
    assert (plugin_class._plugin_name, plugin_class._plugin_namespace, plugin_class._num_outputs) == \
        ("TiDARHybridAttention", "tidar", 1)
    plugin = plugin_class(12, 2, 128, 128 ** -0.5)
    from tensorrt_llm.python_plugin import SymTensor

    out = plugin.shape_dtype_inference([SymTensor(torch.bfloat16, [1, 12, 20, 128])] +
                                       [SymTensor(torch.int64, [])] * 8)
    assert list(out.shape) == [1, 12, 20, 128]


# ---------------------------------------------------------------- ahead-of-time compilation
# Runs in a fresh interpreter (without TRITON_INTERPRET, so the kernel compiles) with a stand-in
# for `tensorrt.plugin` that records what tensorrt_plugin.register() defines: the signatures
# TensorRT validates, the output descriptor, and the aot_impl's kernel, launch and arguments for
# symbolic shapes. Then the fp32 kernel on its own. Triton compiles for an H100 (sm_90) target,
# which needs no GPU.
AOT_SCRIPT = """
import inspect, json, sys, types
from triton.backends.compiler import GPUTarget

class Dim:
    def __init__(self, text, value=None):
        self.text, self.is_fake, self.is_constant, self.value = text, False, value is not None, value
    def constant_value(self):
        return self.value
    def _op(self, sign, other):
        return Dim(f"({self.text} {sign} {getattr(other, 'text', other)})")
    __add__ = lambda self, o: self._op("+", o)
    __sub__ = lambda self, o: self._op("-", o)
    __mul__ = lambda self, o: self._op("*", o)
    __floordiv__ = lambda self, o: self._op("//", o)

class TensorDesc:
    def __init__(self, dims, dtype):
        self.shape_expr, self.dtype = dims, types.SimpleNamespace(name=dtype)
    def like(self):
        return TensorDesc(self.shape_expr, self.dtype.name)

class SymInt32:
    def __init__(self, value):
        self.text = getattr(value, "text", value)

class SymIntExprs:
    @classmethod
    def from_tuple(cls, items):
        made = cls()
        made.items = [item.text for item in items]
        return made

class KernelLaunchParams:
    pass

defined = {}
def decorator(kind):
    def named(plugin_id):
        def record(fn):
            defined[kind] = (plugin_id, fn)
            return fn
        return record
    return named

trtp = types.ModuleType("tensorrt.plugin")
trtp.TensorDesc, trtp.SymInt32, trtp.SymIntExprs = TensorDesc, SymInt32, SymIntExprs
trtp.KernelLaunchParams = KernelLaunchParams
trtp.register, trtp.impl, trtp.aot_impl = decorator("register"), decorator("impl"), decorator("aot_impl")
tensorrt = types.ModuleType("tensorrt")
tensorrt.plugin = trtp
sys.modules.update({"tensorrt": tensorrt, "tensorrt.plugin": trtp})

import functools
from tidar.plugins import hybrid_attention, tensorrt_plugin
compile_kernel = hybrid_attention.compile_kernel
hybrid_attention.compile_kernel = functools.partial(compile_kernel, target=GPUTarget("cuda", 90, 32))  # no GPU here
tensorrt_plugin.register()
report = {kind: {"id": plugin_id, "params": list(inspect.signature(fn).parameters)}
          for kind, (plugin_id, fn) in defined.items()}
describe = defined["register"][1]
signature = inspect.signature(describe)
report["register"]["annotations"] = [getattr(p.annotation, "__name__", str(p.annotation))
                                     for p in signature.parameters.values()]
report["register"]["returns"] = signature.return_annotation.__name__

q = TensorDesc([Dim("B"), Dim("12", 12), Dim("Q"), Dim("128", 128)], "BF16")
kv = [TensorDesc([Dim("B"), Dim("2", 2), Dim("S"), Dim("128", 128)], "BF16") for _ in range(2)]
index = [TensorDesc([Dim("B")], "INT64")] + [TensorDesc([], "INT64") for _ in range(5)]
out = describe(q, *kv, *index, 12, 2, 128, 0.0884)
report["output"] = {"dims": [d.text for d in out.shape_expr], "dtype": out.dtype.name}
name, ptx, launch, args = defined["aot_impl"][1](q, *kv, *index, 12, 2, 128, 0.0884, (out,), 0)
report["aot"] = {"name": name, "entry": f".entry {name}(" in ptx,
                 "params": sum(line.strip().startswith(".param") for line in ptx.splitlines()),
                 "grid": [launch.grid_x.text, launch.grid_y.text], "block_x": launch.block_x,
                 "shared": launch.shared_mem, "args": args.items}
kernel, config = compile_kernel("float32", "int32", 128, 0.0884, target=GPUTarget("cuda", 90, 32))
report["float32"] = {"shared": kernel.metadata.shared, "block_m": config.block_m,
                     "scratch": getattr(kernel.metadata, "global_scratch_size", 0)}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def aot_report():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (pip install 'tidar-trt[kernel]')")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tensorrt_plugin_signatures_follow_the_qdp_schema(aot_report):
    """tensorrt.plugin validates: tensors first, then attributes (annotated, in registration
    order), then outputs and stream (impl) or tactic (aot_impl)."""
    inputs, attributes = list(contract.INPUTS), list(contract.ATTRIBUTES)
    register = aot_report["register"]
    assert register["id"] == "tidar::hybrid_attention" and register["params"] == inputs + attributes
    assert register["annotations"] == ["TensorDesc"] * len(inputs) + ["int", "int", "int", "float"]
    assert register["returns"] == "TensorDesc"
    assert aot_report["aot_impl"]["params"] == inputs + attributes + ["outputs", "tactic"]
    assert aot_report["impl"]["params"] == inputs + ["scale", "outputs", "stream"]
    assert aot_report["output"] == {"dims": ["B", "12", "Q", "128"], "dtype": "BF16"}


def test_tensorrt_aot_kernel_launch_and_arguments(aot_report):
    """What aot_impl gives TensorRT: PTX whose parameters are the 9 inputs, the int32 arguments and
    the output (Triton may append its own scratch pointers), a grid over symbolic shapes, int32
    arguments in the kernel's order, and tiles within 48 KiB of shared memory."""
    aot = aot_report["aot"]
    assert aot["name"] == "_hybrid_attention_kernel" and aot["entry"]
    expected = len(contract.INPUTS) + len(contract.KERNEL_INT_ARGS) + 1
    assert expected <= aot["params"] <= expected + 2
    assert aot["grid"] == ["((Q + 63) // 64)", "(B * 12)"] and aot["block_x"] == 128
    assert aot["args"] == ["Q", "S", 12, 6, "(Q * 1536)", "(Q * 128)", 128, "(S * 256)", "(S * 128)", 128,
                           "(S * 256)", "(S * 128)", 128, "(Q * 1536)", "(Q * 128)", 128]
    assert 0 < aot["shared"] <= 48 * 1024
    fp32 = aot_report["float32"]
    assert fp32["block_m"] == 32 and fp32["scratch"] == 0 and fp32["shared"] <= 48 * 1024


# ---------------------------------------------------------------- the GPU benchmark script
def test_gpu_benchmark_script_parses_arguments_and_refuses_without_cuda(tmp_path):
    script = ROOT / "benchmarks" / "gpu_attention.py"
    for command in ([], ["attention"], ["forward"]):
        done = subprocess.run([sys.executable, str(script), *command, "--help"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, str(script), "attention", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
    assert not (tmp_path / "out").exists()

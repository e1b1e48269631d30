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

from fakes import plugin_aot_check
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
    # eight warps from a 128-wide head tile on (four spill at the register limit: benchmarks/kernel_ptx.py --jit)
    assert (config.num_warps, config.num_stages) == (8 if config.block_d >= 128 else 4, 1 if dtype == "float32" else 2)


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
def _toolchain_problem() -> str | None:
    """The test extra pins what engines are built with; say so plainly when this venv differs."""
    import importlib.metadata

    found = {}
    for package in ("triton", "tensorrt-cu12-bindings"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    if not found["triton"].startswith("3.5.") or not found["tensorrt-cu12-bindings"].startswith("10.13.3"):
        return (f"this venv has triton {found['triton']} and tensorrt-cu12-bindings {found['tensorrt-cu12-bindings']}; "
                "the test extra pins triton==3.5.0 and tensorrt-cu12-bindings==10.13.3.9: pip install -e '.[test]'")
    return None


def _run(*command, timeout=900) -> str:
    problem = _toolchain_problem()
    assert problem is None, problem
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _aot_check(*options) -> dict:
    return json.loads(_run(plugin_aot_check.__file__, *options).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def aot_builds():
    """The plugin registered through NVIDIA's tensorrt.plugin and built as TensorRT's builder does."""
    return _aot_check()


def test_tensorrt_plugin_builds_through_nvidias_plugin_package(aot_builds):
    """NVIDIA's own validators accept register() (signatures, annotations, the aot_impl return
    annotation), and the builder's calls give: the query's dtype and shape as output, a grid over
    the query tiles and batch * heads, int32 arguments equal to the dense strides torch computes
    for the same shapes, shared memory within the limit, and a PTX entry with exactly the
    parameters TensorRT passes."""
    assert "builds" in aot_builds, aot_builds
    for built, compiled in zip(aot_builds["builds"], aot_builds["compiled"]):
        case, sizes = built["case"], built["case"]["sizes"]
        batch, new, kv_len = sizes["B"], sizes["Q"], sizes["S"]
        heads, kv_heads, dim = case["num_heads"], case["num_kv_heads"], case["head_dim"]
        assert built["output_dtypes"] == [case["dtype"]]
        assert built["output_shape"] == [batch, heads, new, dim]
        launch = built["launch"]
        assert (launch["grid_x"], launch["grid_y"], launch["grid_z"]) == (-(-new // compiled["block_m"]),
                                                                           batch * heads, 1)
        assert launch["block_x"] == 32 * compiled["num_warps"] and launch["block_y"] == launch["block_z"] == 1
        assert launch["shared_mem"] == compiled["shared_bytes"] <= contract.MAX_SHARED_BYTES
        q = torch.empty(batch, heads, new, dim).stride()[:3]
        kv = torch.empty(batch, kv_heads, kv_len, dim).stride()[:3]
        assert built["extra_args"] == [new, kv_len, heads, heads // kv_heads, *q, *kv, *kv, *q]
        params = [p for p in built["ptx_entry"].split(",") if ".param" in p]
        assert len(params) == contract.AOT_PARAMS == 26
        assert [".ptr" in p for p in params] == [True] * 9 + [False] * 16 + [True]
        assert compiled["ptx_version"] == "8.7" and compiled["triton"].startswith("3.5.")


def test_missing_aot_return_annotation_is_caught_by_nvidias_validator():
    """The defect of the first version (aot_impl without its return annotation), re-introduced:
    NVIDIA's tensorrt.plugin refuses the registration, and register() says so."""
    report = _aot_check("--defect", "no-return-annotation")
    assert "No return annotation found for aot_impl" in report["register"]
    assert report["register"].startswith("TensorRT refused to register tidar::hybrid_attention")


def test_register_names_a_tensorrt_without_aot_plugins():
    report = _aot_check("--defect", "tensorrt-10.8")
    assert "needs TensorRT >= 10.9" in report["register"] and "aot_impl" in report["register"]


def test_engine_kernels_refuse_another_triton():
    report = _aot_check("--triton-version", "3.9.0")
    assert "triton 3.9.0" in report["build"] and "triton==3.5.0" in report["build"]
    assert contract.engine_triton_problem("3.5.0") is None and contract.engine_triton_problem("3.5.1") is None
    for version in ("3.2.0", "3.3.1", "3.9.0"):
        assert f"triton {version}" in contract.engine_triton_problem(version)


def test_a_shape_over_the_shared_memory_limit_is_refused_by_name():
    """Every tile size is tried, then the build stops with the shape and the bytes (here with a
    4 KiB limit, so that the first case cannot fit)."""
    report = _aot_check("--max-shared", "4096")
    assert "head_dim=128 bfloat16 needs more than 4096 B of shared memory" in report["build"]
    assert "64x64: 32768 B; 64x32:" in report["build"] and "does not support this shape" in report["build"]


def test_kernel_ptx_statistics_of_the_production_shapes():
    """Head dims 64 and 128, fp16 and bf16, on sm_80, sm_90 and sm_100 (Triton's compiler and
    bundled ptxas -v, no GPU): no register spills, 16-byte vector loads and no scalar 16-bit
    loads, shared memory within the limit, 26 entry parameters, PTX ISA 8.7."""
    lines = _run(str(ROOT / "benchmarks" / "kernel_ptx.py"), "--jobs", "2").strip().splitlines()
    stats = [json.loads(line) for line in lines]
    assert len(stats) == 12
    for shape in stats:
        name = f"{shape['arch']} {shape['dtype']} head_dim={shape['head_dim']}"
        assert shape["spill_stores"] == shape["spill_loads"] == 0, name
        assert shape["vector_loads"] > 0 and shape["scalar_16bit_loads"] == 0, name
        assert shape["shared_bytes"] <= contract.MAX_SHARED_BYTES, name
        assert shape["entry_params"] == contract.AOT_PARAMS and shape["ptx_version"] == "8.7", name


PTX = """.version 8.7
.target sm_90a
.visible .entry kern(
\t.param .u64 .ptr .global .align 1 kern_param_0,
\t.param .u32 kern_param_1,
\t.param .u64 .ptr .global .align 1 kern_param_2,
\t.param .u64 .ptr .global .align 1 kern_param_3
)
{
\tld.param.u64 %rd1, [kern_param_0];
\tld.param.u32 %r1, [kern_param_1];
\tld.param.u64 %rd2, [kern_param_2];
}
"""


def test_entry_params_drop_only_unused_trailing_parameters():
    def header(ptx):
        return ptx.split("{", 1)[0]

    trimmed = contract.entry_params(PTX, 3)
    assert "kern_param_3" not in trimmed and header(trimmed).count(".param") == 3
    assert trimmed.split("{", 1)[1] == PTX.split("{", 1)[1]  # the body is untouched
    assert header(contract.entry_params(PTX, 4)).count(".param") == 4
    with pytest.raises(ValueError, match="reads its extra parameter kern_param_2"):
        contract.entry_params(PTX, 2)
    with pytest.raises(ValueError, match="declares 4 parameters, fewer than the 5"):
        contract.entry_params(PTX, 5)


def test_aot_tile_candidates():
    configs = contract.aot_configs(128, "float16", num_stages=1)
    assert [(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in configs] == [
        (64, 64, 8, 1), (64, 32, 8, 1), (32, 32, 8, 1)]
    assert [(c.block_m, c.block_n, c.num_warps) for c in contract.aot_configs(64, "bfloat16", 1)][0] == (64, 64, 4)
    assert [(c.block_m, c.block_n) for c in contract.aot_configs(256, "float32", 1)] == [(32, 32), (32, 16), (16, 16)]


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

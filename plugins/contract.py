"""The contract of the hybrid-attention plugin `tidar::hybrid_attention`, in plain Python.

One op, three front ends (the torch launcher in hybrid_attention.py, the TensorRT plugin in
tensorrt_plugin.py, the TensorRT-LLM plugin in trtllm_plugin.py), and one set of rules that
all of them apply. Nothing here imports torch, triton or tensorrt, so every rule is tested on
any machine.

The op (the ONNX node of export/onnx_export.py):
    inputs      query      [batch, num_heads, new, head_dim]     RoPE applied
                key, value [batch, num_kv_heads, kv_len, head_dim]  the new tokens already
                                                                 written at slots past_lens[b] ..
                past_lens  [batch]                               cached length of each row
                causal_len, num_blocks, block_len, first_visible, visible_stride
                           []                                    `Layout.kernel_scalars()`
    attributes  num_heads, num_kv_heads, head_dim (ints), scale (float > 0)
    output      [batch, num_heads, new, head_dim], the dtype of query

Shapes are tuples whose entries are ints or None (unknown at build time). Dtypes are names:
"float32", "float16", "bfloat16", "int32", "int64".

The kernel's launch (shared by the torch launcher and the ahead-of-time TensorRT kernel): a
grid of (query tiles, batch * num_heads) programs, the int32 scalar arguments listed in
`KERNEL_INT_ARGS` after the input pointers and before the output pointer, and the
compile-time constants of `launch_config`. The grid and argument helpers only use +, * and
//, so they take ints or TensorRT's symbolic shape expressions alike.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

LAYOUT_SCALARS = ("causal_len", "num_blocks", "block_len", "first_visible", "visible_stride")
INPUTS = ("query", "key", "value", "past_lens", *LAYOUT_SCALARS)
ATTRIBUTES = ("num_heads", "num_kv_heads", "head_dim", "scale")
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}
MAX_HEAD_DIM = 256

# The kernel's int32 arguments, in order (between the input pointers and the output pointer).
KERNEL_INT_ARGS = (
    "num_new", "kv_len", "num_heads", "kv_group",
    "stride_qb", "stride_qh", "stride_qm",
    "stride_kb", "stride_kh", "stride_kn",
    "stride_vb", "stride_vh", "stride_vn",
    "stride_ob", "stride_oh", "stride_om",
)

Shape = Sequence["int | None"]

# What TensorRT's ahead-of-time launch gives the kernel (tensorrt/plugin/_lib.py: extra args go
# "after the tensor inputs and before the tensor outputs"; nothing else is passed).
AOT_PARAMS = len(INPUTS) + len(KERNEL_INT_ARGS) + 1
"""Parameters TensorRT passes: the inputs, the int32 arguments, the output."""
MAX_SHARED_BYTES = 48 * 1024
"""Shared memory a kernel may use without the opt-in (cuFuncSetAttribute) that Triton's own
launcher makes and TensorRT's ahead-of-time launch does not document."""
ENGINE_TRITON = "3.5"
"""The Triton release engine kernels are compiled with: TensorRT-LLM 1.2.x pins triton==3.5.0
(its requirements.txt). Its PTX (ISA 8.7, CUDA 12.8) loads on the drivers of that stack; 3.9
writes ISA 9.4 (CUDA 13.4), and 3.2 lacks ASTSource(constexprs=)."""


# ---------------------------------------------------------------- attributes
def default_scale(head_dim: int) -> float:
    """The usual softmax scale, 1 / sqrt(head_dim)."""
    return head_dim ** -0.5


def check_attributes(num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
    """Raise ValueError unless the plugin attributes are usable."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"attribute {name} must be a positive int, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"attribute num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attribute head_dim={head_dim} is larger than the kernel supports ({MAX_HEAD_DIM})")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"attribute scale must be a finite number > 0, got {scale!r}")


# ---------------------------------------------------------------- shapes and dtypes
def _rank_error(name: str, shape: Shape, expected: str) -> ValueError:
    return ValueError(f"{name} has shape {tuple(shape)}; expected {expected}")


def _same(name: str, shape: Shape, axis: int, what: str, expected) -> None:
    """Check one dimension against an expected value (skipped when either is unknown)."""
    value = shape[axis]
    if value is not None and expected is not None and value != expected:
        raise ValueError(f"{name} has {what}={value} (shape {tuple(shape)}); expected {what}={expected}")


def check_shapes(shapes: Mapping[str, Shape], num_heads: int | None = None, num_kv_heads: int | None = None,
                 head_dim: int | None = None) -> tuple:
    """Check the input shapes (entries may be None when unknown) against each other and, when
    given, against the attributes; return the output shape."""
    missing = [name for name in INPUTS if name not in shapes]
    if missing:
        raise ValueError(f"missing input shapes: {', '.join(missing)}")
    query, key, value, past_lens = (tuple(shapes[name]) for name in INPUTS[:4])
    if len(query) != 4:
        raise _rank_error("query", query, "[batch, num_heads, new, head_dim]")
    for name, shape in (("key", key), ("value", value)):
        if len(shape) != 4:
            raise _rank_error(name, shape, "[batch, num_kv_heads, kv_len, head_dim]")
    if len(past_lens) != 1:
        raise _rank_error("past_lens", past_lens, "[batch]")
    for name in LAYOUT_SCALARS:
        if len(shapes[name]) != 0:
            raise _rank_error(name, shapes[name], "a scalar (shape ())")
    batch, heads, _, dim = query
    _same("query", query, 1, "num_heads", num_heads)
    _same("query", query, 3, "head_dim", head_dim)
    dim = dim if dim is not None else head_dim
    for name, shape in (("key", key), ("value", value)):
        _same(name, shape, 0, "batch", batch)
        _same(name, shape, 1, "num_kv_heads", num_kv_heads)
        _same(name, shape, 3, "head_dim", dim)
    for axis, what in ((0, "batch"), (1, "num_kv_heads"), (2, "kv_len")):
        _same("value", value, axis, what, key[axis])
    _same("past_lens", past_lens, 0, "batch", batch)
    heads = heads if heads is not None else num_heads
    kv_heads = key[1] if key[1] is not None else num_kv_heads
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(f"query has {heads} heads, not a multiple of the {kv_heads} heads of key/value")
    if dim is not None and not 0 < dim <= MAX_HEAD_DIM:
        raise ValueError(f"query has head_dim={dim}; the kernel supports 1..{MAX_HEAD_DIM}")
    return query


def check_dtypes(dtypes: Mapping[str, str]) -> str:
    """Check the input dtypes (names); return the output dtype (that of query)."""
    activation = dtypes["query"]
    if activation not in ACTIVATION_DTYPES:
        raise ValueError(f"query has dtype {activation}; expected one of {', '.join(ACTIVATION_DTYPES)}")
    for name in ("key", "value"):
        if dtypes[name] != activation:
            raise ValueError(f"{name} has dtype {dtypes[name]}; expected {activation}, the dtype of query")
    for name in ("past_lens", *LAYOUT_SCALARS):
        if name in dtypes and dtypes[name] not in INDEX_DTYPES:
            raise ValueError(f"{name} has dtype {dtypes[name]}; expected one of {', '.join(INDEX_DTYPES)}")
    return activation


# ---------------------------------------------------------------- launch
@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time tile sizes and launch resources of the kernel."""

    block_m: int
    """Query rows per program (the query tile)."""
    block_n: int
    """Key slots per loop iteration (the key tile)."""
    block_d: int
    """head_dim rounded up to a power of two (>= 16, the smallest tl.dot)."""
    num_warps: int
    num_stages: int


def _pow2_at_least(value: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, value - 1).bit_length())


def default_num_warps(head_dim: int) -> int:
    """Warps per program: eight from head_dim 128 on, where with four the kernel needs more than
    255 registers per thread and spills (ptxas -v of the sm_80 and sm_90 kernels:
    benchmarks/kernel_ptx.py), four below. The just-in-time and the ahead-of-time kernel share it."""
    return 8 if _pow2_at_least(head_dim) >= 128 else 4


def launch_config(head_dim: int, dtype: str, num_new: int | None = None, block_m: int | None = None,
                  block_n: int | None = None, num_stages: int | None = None,
                  num_warps: int | None = None) -> LaunchConfig:
    """Tile sizes for a head width and activation dtype. `num_new` (when known, as in the torch
    launcher) shrinks the query tile for short query runs (AR and small-draft decode steps); the
    ahead-of-time kernel, compiled for any number of new tokens, leaves it None. `block_m` and
    `block_n` override the defaults (powers of two >= 16; tests use small tiles); `num_warps`
    defaults to `default_num_warps`."""
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(ACTIVATION_DTYPES)}")
    block_d = _pow2_at_least(head_dim)
    # Sized so that the tiles of head_dim <= 128 fit in 48 KiB of shared memory (measured on
    # the sm_90 PTX), the most a kernel gets without an opt-in: fp32 halves both tiles and
    # keeps one pipeline stage.
    wide = dtype == "float32" or block_d > 128
    if block_m is None:
        block_m = 32 if wide else 64
        if num_new is not None:
            block_m = min(block_m, _pow2_at_least(num_new))
    if block_n is None:
        block_n = 32 if wide else 64
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two >= 16")
    if num_stages is None:
        num_stages = 1 if dtype == "float32" else 2
    return LaunchConfig(block_m, block_n, block_d, num_warps=num_warps or default_num_warps(head_dim),
                        num_stages=num_stages)


def aot_configs(head_dim: int, dtype: str, num_stages: int) -> list[LaunchConfig]:
    """Tile sizes for the ahead-of-time kernel, in order of preference: the defaults, then a
    halved key tile, then halved query and key tiles (down to 16); the first whose compiled kernel
    fits the shared-memory limit is used (hybrid_attention.aot_kernel). Warps: `default_num_warps`."""
    warps = default_num_warps(head_dim)
    first = launch_config(head_dim, dtype, num_stages=num_stages, num_warps=warps)
    found = [first]
    for block_m, block_n in ((first.block_m, first.block_n // 2), (first.block_m // 2, first.block_n // 2)):
        if min(block_m, block_n) >= 16:
            found.append(launch_config(head_dim, dtype, block_m=block_m, block_n=block_n, num_stages=num_stages,
                                       num_warps=warps))
    return list(dict.fromkeys(found))


def launch_grid(batch, num_heads: int, num_new, block_m: int) -> tuple:
    """Programs of one launch: (query tiles, batch * num_heads, 1). `batch` and `num_new` may be
    symbolic (TensorRT's expressions have +, -, *, // with an int on the right only)."""
    return ((num_new + (block_m - 1)) // block_m, batch * num_heads, 1)


def contiguous_int_args(num_new, kv_len, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple:
    """The kernel's int arguments (`KERNEL_INT_ARGS`) for dense query/key/value/output, from the
    sizes alone (TensorRT passes dense, linear-format tensors). `num_new` and `kv_len` may be
    symbolic, as in `launch_grid`."""
    q_strides = (num_new * (num_heads * head_dim), num_new * head_dim, head_dim)
    kv_strides = (kv_len * (num_kv_heads * head_dim), kv_len * head_dim, head_dim)
    return (num_new, kv_len, num_heads, num_heads // num_kv_heads, *q_strides, *kv_strides, *kv_strides, *q_strides)


# ---------------------------------------------------------------- ahead-of-time kernels
def engine_triton_problem(version: str | None = None) -> str | None:
    """Why Triton `version` (default: the installed one) cannot compile engine kernels (None: it
    can), naming both versions."""
    if version is None:
        try:
            version = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            return f"engine kernels need triton {ENGINE_TRITON}.x (pip install 'triton==3.5.0'); triton is not installed"
    if version.split(".")[:2] != ENGINE_TRITON.split("."):
        return (f"engine kernels are compiled with triton {ENGINE_TRITON}.x, the version TensorRT-LLM 1.2.x pins "
                f"(triton==3.5.0); this Python has triton {version} (pip install 'triton==3.5.0')")
    return None


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)


def entry_params(ptx: str, count: int = AOT_PARAMS) -> str:
    """`ptx` with its kernel entry declaring only its first `count` parameters (Triton appends
    scratch pointers that TensorRT does not pass). Raises ValueError when it declares fewer, or
    when a parameter to drop is referenced by the body."""
    match = _ENTRY.search(ptx)
    if match is None:
        raise ValueError("no .entry in the PTX")
    params = [param.strip() for param in match.group(2).split(",") if param.strip()]
    if len(params) < count:
        raise ValueError(f"the kernel entry {match.group(1)} declares {len(params)} parameters, fewer than the "
                         f"{count} TensorRT passes")
    body = ptx[match.end():]
    for param in params[count:]:
        name = param.split()[-1]
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise ValueError(f"the kernel reads its extra parameter {name}, which TensorRT does not pass")
    return ptx[:match.start(2)] + "\n\t" + ",\n\t".join(params[:count]) + "\n" + ptx[match.end(2):]

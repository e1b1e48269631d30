"""The hybrid-mask attention kernel (Triton language) and its torch launcher.

`hybrid_attention(query, key, value, past_lens, causal_len, num_blocks, block_len,
first_visible, visible_stride, scale=...)` computes what the ONNX node `tidar::hybrid_attention`
specifies (contract.py): attention of the new tokens' queries over each row's cached prefix and
the new tokens' own keys, under TiDAR's hybrid mask. The mask is never materialized: every
program derives it from the five layout scalars and its row's past length, with the rule of
runtime/layout.py `visible` re-written in tl ops (`_visible`).

Kernel design (flash attention, forward only):
- one program per (query tile of BLOCK_M new tokens, batch row, query head); the key/value
  head is head // (num_heads // num_kv_heads) (GQA of any ratio);
- an online softmax in fp32 (running max and sum, exp2 with the scale folded in), fp32
  accumulation; 16-bit inputs feed tl.dot as they are, fp32 inputs use IEEE products;
- key tiles of BLOCK_N slots are visited only where the tile can hold a visible key. Rows of a
  query tile see, together, at most two runs of slots (`_key_ranges`):
      [0, past + causal_end)            the cached prefix and the causal tokens seen by any
                                        row of the tile (causal rows: up to themselves; mask
                                        rows: the first v_j causal tokens of their block j)
      [past + own_start, past + own_end) the blocks of the tile's mask rows (own-block keys)
  Tiles wholly inside the cached prefix need no mask and skip its evaluation; the other tiles
  evaluate the full rule per element. Every other key tile is skipped: for a b = 16 decode
  step most of the 272 x 272 square of new tokens is never loaded. `key_tile_schedule` is the
  same computation in plain Python (tests compare it with the kernel's own count of visited
  tiles, written to the optional `tile_counts` output).
- rows without any visible key (impossible for valid layouts) produce zeros, never NaN.

Layout scalars may be Python ints (the torch path: no copy to the device) or 0-d integer
tensors on the device (TensorRT passes them so); the kernel loads them in the latter case.
Argument order is inputs, int32 scalars, output, as TensorRT's ahead-of-time plugins require
(`compile_kernel` builds that kernel; tensorrt_plugin.py bakes it into engines).

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was
imported (slow; for tests).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import contract
from .contract import LAYOUT_SCALARS


# ---------------------------------------------------------------- the kernel
@triton.jit
def _layout_value(x):
    """A layout scalar passed by value (an int) or by address (a 0-d tensor, as from TensorRT)."""
    if x.dtype.is_ptr():
        return tl.load(x).to(tl.int32)
    else:
        return x.to(tl.int32)


@triton.jit
def _visible(q_idx, kv_slot, past, causal_len, num_blocks, block_len, first_visible, visible_stride):
    """runtime/layout.py `visible`, elementwise in tl ops. Integer // truncates here (it floors
    in torch); block indices are only used where their argument is >= 0, where the two agree."""
    k_idx = kv_slot - past
    q_mask = q_idx >= causal_len
    k_causal = (k_idx >= 0) & (k_idx < causal_len)
    step = tl.maximum(block_len, 1)
    q_block = (q_idx - causal_len) // step
    k_block = (k_idx - causal_len) // step
    sees = first_visible + q_block * visible_stride
    num_new = causal_len + num_blocks * block_len
    causal_to_causal = (q_idx < causal_len) & k_causal & (k_idx <= q_idx)
    block_to_causal = q_mask & k_causal & (k_idx < sees)
    block_to_own_block = q_mask & (k_idx >= causal_len) & (k_idx < num_new) & (k_block == q_block)
    return (kv_slot < past) | causal_to_causal | block_to_causal | block_to_own_block


@triton.jit
def _key_ranges(q_start, num_new, past, kv_len, causal_len, block_len, first_visible, visible_stride,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles that query rows [q_start, q_start + BLOCK_M) may see: tiles starting in
    [0, prefix_end) need no mask, tiles starting in [prefix_end, seen_end) and [own_start,
    own_end) are masked (see the module docstring; `key_ranges` is the Python twin)."""
    q_end = tl.minimum(q_start + BLOCK_M, num_new)
    step = tl.maximum(block_len, 1)
    causal_end = tl.where(q_start < causal_len, tl.minimum(q_end, causal_len), 0)
    has_blocks = q_end > causal_len
    first = tl.maximum(q_start - causal_len, 0) // step
    last = tl.maximum(q_end - 1 - causal_len, 0) // step
    sees = tl.maximum(first_visible + first * visible_stride, first_visible + last * visible_stride)
    causal_end = tl.where(has_blocks, tl.maximum(causal_end, sees), causal_end)
    prefix_end = (tl.minimum(past, kv_len) // BLOCK_N) * BLOCK_N
    seen_end = tl.minimum(past + causal_end, kv_len)
    own_start = tl.maximum(tl.maximum(((past + causal_len + first * block_len) // BLOCK_N) * BLOCK_N,
                                      tl.cdiv(seen_end, BLOCK_N) * BLOCK_N), 0)
    own_end = tl.where(has_blocks, tl.minimum(past + causal_len + (last + 1) * block_len, kv_len), 0)
    return prefix_end, seen_end, own_start, own_end


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, offs_m, offs_n, offs_d, d_ok,
                 past, kv_len, causal_len, num_blocks, block_len, first_visible, visible_stride,
                 SCALE_LOG2E: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One step of the online softmax over the key tile at slot `start`."""
    slots = start + offs_n
    in_cache = (slots >= 0) & (slots < kv_len)  # a lower bound too: never read before the row (bad scalars)
    k = tl.load(k_base + slots[None, :] * stride_kn + offs_d[:, None], mask=in_cache[None, :] & d_ok[:, None],
                other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    scores = tl.dot(q, k, input_precision=DOT_PRECISION) * SCALE_LOG2E
    if MASKED:
        seen = _visible(offs_m[:, None], slots[None, :], past, causal_len, num_blocks, block_len, first_visible,
                        visible_stride)
        scores = tl.where(seen & in_cache[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))  # m_i starts finite, so m_new is never -inf
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = tl.load(v_base + slots[:, None] * stride_vn + offs_d[None, :], mask=in_cache[:, None] & d_ok[None, :],
                other=0.0)
    p_v = p.to(v.dtype)  # the probabilities round to the input dtype, as in flash attention
    if UPCAST:
        p_v, v = p_v.to(tl.float32), v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit(do_not_specialize=["CausalLen", "NumBlocks", "BlockLen", "FirstVisible", "VisibleStride",
                               "num_new", "kv_len", "num_heads", "kv_group"])
def _hybrid_attention_kernel(
    # inputs (the layout scalars: ints or pointers to 0-d tensors)
    Q, K, V, PastLens, CausalLen, NumBlocks, BlockLen, FirstVisible, VisibleStride,
    # int32 scalars (contract.KERNEL_INT_ARGS)
    num_new, kv_len, num_heads, kv_group,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    # output
    Out,
    # debug output, int32 [batch * num_heads, query tiles]: key tiles visited (None: off)
    TileCounts,
    SCALE_LOG2E: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // num_heads, pid_bh % num_heads
    kv_head = head // kv_group
    causal_len, num_blocks, block_len = _layout_value(CausalLen), _layout_value(NumBlocks), _layout_value(BlockLen)
    first_visible, visible_stride = _layout_value(FirstVisible), _layout_value(VisibleStride)
    past = tl.maximum(tl.load(PastLens + batch).to(tl.int32), 0)

    q_start = pid_m * BLOCK_M
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < num_new
    batch64 = batch.to(tl.int64)
    q_ptrs = Q + batch64 * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + batch64 * stride_kb + kv_head * stride_kh
    v_base = V + batch64 * stride_vb + kv_head * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    prefix_end, seen_end, own_start, own_end = _key_ranges(
        q_start, num_new, past, kv_len, causal_len, block_len, first_visible, visible_stride, BLOCK_M, BLOCK_N)
    for start in range(0, prefix_end, BLOCK_N):  # wholly cached: every key is visible
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, offs_m, offs_n,
                                     offs_d, d_ok, past, kv_len, causal_len, num_blocks, block_len, first_visible,
                                     visible_stride, SCALE_LOG2E, False, DOT_PRECISION, UPCAST)
    # masked tiles: those starting in [prefix_end, seen_end), then those in [own_start, own_end)
    num_seen = tl.cdiv(seen_end - prefix_end, BLOCK_N)
    num_masked = num_seen + tl.cdiv(tl.maximum(own_end - own_start, 0), BLOCK_N)
    for index in range(0, num_masked):
        start = tl.where(index < num_seen, prefix_end + index * BLOCK_N, own_start + (index - num_seen) * BLOCK_N)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, offs_m, offs_n,
                                     offs_d, d_ok, past, kv_len, causal_len, num_blocks, block_len, first_visible,
                                     visible_stride, SCALE_LOG2E, True, DOT_PRECISION, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + batch64 * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if TileCounts is not None:
        tl.store(TileCounts + pid_bh * tl.num_programs(0) + pid_m, prefix_end // BLOCK_N + num_masked)


INTERPRETED = not isinstance(_hybrid_attention_kernel, triton.runtime.JITFunction)
"""True when TRITON_INTERPRET=1 was set before import: the kernel then runs on CPU tensors."""


# ---------------------------------------------------------------- the tile schedule in Python
def key_ranges(q_start: int, num_new: int, past: int, kv_len: int, causal_len: int, block_len: int,
               first_visible: int, visible_stride: int, block_m: int, block_n: int) -> tuple[int, int, int, int]:
    """`_key_ranges` of the kernel in Python: (prefix_end, seen_end, own_start, own_end)."""
    q_end = min(q_start + block_m, num_new)
    step = max(block_len, 1)
    causal_end = min(q_end, causal_len) if q_start < causal_len else 0
    has_blocks = q_end > causal_len
    first = max(q_start - causal_len, 0) // step
    last = max(q_end - 1 - causal_len, 0) // step
    if has_blocks:
        causal_end = max(causal_end, first_visible + first * visible_stride, first_visible + last * visible_stride)
    past = max(past, 0)
    prefix_end = min(past, kv_len) // block_n * block_n
    seen_end = min(past + causal_end, kv_len)
    own_start = max((past + causal_len + first * block_len) // block_n * block_n, -(-seen_end // block_n) * block_n)
    own_end = min(past + causal_len + (last + 1) * block_len, kv_len) if has_blocks else 0
    return prefix_end, seen_end, own_start, own_end


def key_tile_schedule(num_new: int, past: int, kv_len: int, block_m: int, block_n: int, causal_len: int,
                      num_blocks: int, block_len: int, first_visible: int, visible_stride: int) -> list[list[int]]:
    """First slot of every key tile the kernel visits, for each query tile of a row with cached
    length `past` (the layout as `Layout.kernel_scalars()`; num_blocks follows from the rows)."""
    schedule = []
    for q_start in range(0, num_new, block_m):
        prefix_end, seen_end, own_start, own_end = key_ranges(
            q_start, num_new, past, kv_len, causal_len, block_len, first_visible, visible_stride, block_m, block_n)
        tiles = [*range(0, prefix_end, block_n), *range(prefix_end, seen_end, block_n),
                 *range(own_start, own_end, block_n)]
        schedule.append(tiles)
    return schedule


# ---------------------------------------------------------------- the torch launcher
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layout_argument(name: str, value, device: torch.device):
    """A layout scalar as the kernel takes it: an int, or a 0-d integer tensor on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int or a 0-d int32/int64 tensor, got a {_dtype_name(value.dtype)} "
                             f"tensor of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}; expected {device}, the device of query")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int or a 0-d integer tensor, got {value!r}")
    if not -2**31 <= value < 2**31:
        raise ValueError(f"{name}={value} does not fit in int32")
    return value


def check_device(device: torch.device) -> None:
    """Raise ValueError unless the kernel can run on tensors of `device`."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    raise ValueError(f"query is on {device}: the Triton kernel runs on CUDA tensors, or on CPU tensors when "
                     "TRITON_INTERPRET=1 is set before triton is imported (slow; for tests)")


def _tensor_inputs(query, key, value, past_lens) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value), ("past_lens", past_lens)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}; expected {query.device}, the device of query")
    contract.check_shapes({"query": query.shape, "key": key.shape, "value": value.shape, "past_lens": past_lens.shape,
                           **{name: () for name in LAYOUT_SCALARS}})
    contract.check_dtypes({"query": _dtype_name(query.dtype), "key": _dtype_name(key.dtype),
                           "value": _dtype_name(value.dtype), "past_lens": _dtype_name(past_lens.dtype)})


def _last_dim_dense(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _layout_arguments(values, num_new: int, device: torch.device) -> list:
    layout = [_layout_argument(name, value, device) for name, value in zip(LAYOUT_SCALARS, values)]
    if all(isinstance(value, int) for value in layout):
        causal_len, num_blocks, block_len = layout[:3]
        if causal_len + num_blocks * block_len != num_new:
            raise ValueError(f"query has {num_new} new tokens but the layout (causal_len={causal_len}, num_blocks="
                             f"{num_blocks}, block_len={block_len}) has {causal_len + num_blocks * block_len}")
    return layout


def _output(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(query, memory_format=torch.contiguous_format)
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {_dtype_name(query.dtype)} tensor of shape {tuple(query.shape)} on "
                         f"{query.device} with a dense last dimension, got {_dtype_name(out.dtype)} "
                         f"{tuple(out.shape)} on {out.device}")
    return out


def _check_tile_counts(tile_counts: torch.Tensor | None, grid: tuple) -> None:
    if tile_counts is None:
        return
    if tile_counts.dtype != torch.int32 or tile_counts.numel() != grid[0] * grid[1] or not tile_counts.is_contiguous():
        raise ValueError(f"tile_counts must be a contiguous int32 tensor of {grid[1]} x {grid[0]} elements "
                         f"([batch, num_heads, query tiles]), got {_dtype_name(tile_counts.dtype)} "
                         f"{tuple(tile_counts.shape)}")


def hybrid_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_lens: torch.Tensor,
                     causal_len, num_blocks, block_len, first_visible, visible_stride, *,
                     scale: float | None = None, out: torch.Tensor | None = None,
                     block_m: int | None = None, block_n: int | None = None,
                     tile_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Attention under the hybrid mask (the contract of `tidar::hybrid_attention`).

    query [B, num_heads, new, D] (RoPE applied); key/value [B, num_kv_heads, kv_len, D] with the
    new tokens written at slots [past_lens[b], past_lens[b] + new); past_lens [B] int32/int64;
    the five layout scalars as ints or 0-d integer tensors; `scale` defaults to D ** -0.5.
    Returns [B, num_heads, new, D] in query's dtype (written into `out` when given). Keys past
    kv_len are never read, whatever past_lens says.

    `block_m`/`block_n` override the tile sizes; `tile_counts` (int32 [B, num_heads, query
    tiles], debug) receives the number of key tiles each program visited.
    """
    _tensor_inputs(query, key, value, past_lens)
    check_device(query.device)
    batch, num_heads, num_new, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    scale = contract.default_scale(head_dim) if scale is None else scale
    contract.check_attributes(num_heads, num_kv_heads, head_dim, scale)
    layout = _layout_arguments((causal_len, num_blocks, block_len, first_visible, visible_stride), num_new,
                               query.device)
    dtype = _dtype_name(query.dtype)
    config = contract.launch_config(head_dim, dtype, num_new=num_new, block_m=block_m, block_n=block_n)
    grid = contract.launch_grid(batch, num_heads, num_new, config.block_m)
    out = _output(query, out)
    _check_tile_counts(tile_counts, grid)
    if out.numel() == 0:
        return out
    query, key, value = _last_dim_dense(query), _last_dim_dense(key), _last_dim_dense(value)
    with launch_device(query.device):
        _hybrid_attention_kernel[grid[:2]](
            query, key, value, past_lens.contiguous(), *layout,
            num_new, kv_len, num_heads, num_heads // num_kv_heads,
            *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
            out, tile_counts,
            **kernel_constants(head_dim, dtype, scale, config),
            num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def launch_device(device: torch.device):
    """The context a launch runs in: Triton launches on the calling thread's current CUDA device
    and stream (triton/runtime/jit.py: driver.active.get_current_device(), get_current_stream), not on
    the tensors' device, so a launch on tensors of cuda:1 from a thread whose current device is 0
    makes it current first. CPU tensors (the interpreter) need nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def kernel_constants(head_dim: int, dtype: str, scale: float, config: contract.LaunchConfig) -> dict:
    """The kernel's compile-time constants (tl.constexpr arguments).

    UPCAST: Triton's interpreter (3.9) multiplies the bit patterns of bf16 operands of tl.dot as
    integers, so there bf16 tiles go to tl.dot as fp32. A bf16 x bf16 product is exact in fp32,
    so this keeps the GPU's numerics (bf16 inputs, fp32 accumulation)."""
    upcast = INTERPRETED and dtype == "bfloat16"
    return {"SCALE_LOG2E": float(scale) * math.log2(math.e), "HEAD_DIM": head_dim, "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n, "BLOCK_D": config.block_d,
            "DOT_PRECISION": "ieee" if dtype == "float32" or upcast else "tf32", "UPCAST": upcast}


# ---------------------------------------------------------------- buffers of the TensorRT front ends
_STORAGE_TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "int32": "<i4", "int64": "<i8"}


class _CudaBuffer:
    """A dense device buffer described by the CUDA array interface (read by torch.as_tensor)."""

    def __init__(self, pointer: int, shape, typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(int(d) for d in shape), "typestr": typestr,
                                         "data": (int(pointer), False), "version": 3}


def tensor_from_pointer(pointer: int, shape, dtype: str) -> torch.Tensor:
    """A dense CUDA tensor over `pointer` (no copy), from a dtype name of contract.py: how the
    TensorRT front ends hand their buffers to `hybrid_attention`. bf16 travels as int16 (the
    array interface has no name for it) and is viewed back."""
    if dtype not in _STORAGE_TYPESTR:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(_STORAGE_TYPESTR)}")
    storage = torch.as_tensor(_CudaBuffer(pointer, shape, _STORAGE_TYPESTR[dtype]), device="cuda")
    return storage.view(getattr(torch, dtype))


# ---------------------------------------------------------------- ahead-of-time compilation
AOT_NUM_STAGES = 1
"""The AOT kernel's pipeline stages: with 16-byte vector loads one stage keeps head_dim 128 tiles
in 32 KiB and needs no spills (two stages double the tiles for no measured gain)."""
_POINTER_ARGS = ("Q", "K", "V", "Out")


def compile_kernel(dtype: str, index_dtype: str, head_dim: int, scale: float, target=None,
                   config: contract.LaunchConfig | None = None):
    """Compile the kernel for TensorRT's ahead-of-time plugin: activations of `dtype`, past
    lengths and layout scalars of `index_dtype`, all passed by address, then the int32 scalars
    of `contract.KERNEL_INT_ARGS`, then the output; no debug output. `target` is a
    triton.backends.compiler.GPUTarget (default: the current GPU); `config` the tiles (default:
    `contract.launch_config(head_dim, dtype)`). When head_dim is a multiple of 16, pointers and
    strides carry Triton's divisibility-by-16 hint (what the JIT launcher finds by itself), which
    gives 16-byte vector loads. That assumes 16-byte aligned buffers: TensorRT documents 256-byte
    alignment for network I/O tensors (NvInferRuntime.h), not for the activations it hands a
    plugin; a misaligned vector load faults (it cannot read wrong data). Returns
    (compiled kernel, its LaunchConfig); the kernel's `.asm["ptx"]` and `.metadata` (name,
    shared) feed the plugin (through `aot_kernel`)."""
    if INTERPRETED:
        raise RuntimeError("compile_kernel needs the compiled kernel; unset TRITON_INTERPRET and re-import")
    contract.check_dtypes({"query": dtype, "key": dtype, "value": dtype, "past_lens": index_dtype})
    config = config or contract.launch_config(head_dim, dtype)
    types = contract.TRITON_TYPES
    signature = {name: f"*{types[dtype]}" for name in ("Q", "K", "V")}
    signature.update({name: f"*{types[index_dtype]}" for name in
                      ("PastLens", "CausalLen", "NumBlocks", "BlockLen", "FirstVisible", "VisibleStride")})
    signature.update({name: "i32" for name in contract.KERNEL_INT_ARGS})
    signature["Out"] = f"*{types[dtype]}"
    constants = {"TileCounts": None, **kernel_constants(head_dim, dtype, scale, config)}
    signature.update({name: "constexpr" for name in constants})
    attrs = None
    if head_dim % 16 == 0:
        hinted = _POINTER_ARGS + tuple(name for name in contract.KERNEL_INT_ARGS if name.startswith("stride"))
        names = _hybrid_attention_kernel.arg_names
        attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in hinted}
    source = triton.compiler.ASTSource(fn=_hybrid_attention_kernel, signature=signature, constexprs=constants,
                                       attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=target, options=options), config


@dataclass(frozen=True)
class AotKernel:
    """The kernel as TensorRT's ahead-of-time plugin takes it."""

    name: str
    ptx: str
    """PTX whose entry has exactly TensorRT's arguments (see `entry_params`)."""
    shared: int
    num_warps: int
    config: contract.LaunchConfig
    ptx_version: str
    """The PTX ISA version (`.version`): the driver must support it."""


def aot_kernel(dtype: str, index_dtype: str, head_dim: int, scale: float, target=None) -> AotKernel:
    """The kernel for TensorRT's ahead-of-time plugin, checked for what TensorRT's launch gives it:
    - built with contract.ENGINE_TRITON (else RuntimeError naming both versions);
    - no global or profile scratch memory (TensorRT passes no scratch pointers);
    - at most contract.MAX_SHARED_BYTES of shared memory: the tiles of `contract.aot_configs` are tried in
      order, and a shape none of them fits is refused (ValueError naming it);
    - the PTX entry declares exactly the inputs, `KERNEL_INT_ARGS` and the output, the arguments
      TensorRT passes: Triton's trailing scratch parameters (unused when their sizes are 0) are
      removed after checking that the body never reads them."""
    problem = contract.engine_triton_problem(triton.__version__)
    if problem:
        raise RuntimeError(problem)
    tried = []
    for config in contract.aot_configs(head_dim, dtype, AOT_NUM_STAGES):
        kernel, config = compile_kernel(dtype, index_dtype, head_dim, scale, target=target, config=config)
        tried.append(f"{config.block_m}x{config.block_n}: {kernel.metadata.shared} B")
        if kernel.metadata.shared <= contract.MAX_SHARED_BYTES:
            break
    else:
        arch = getattr(kernel.metadata, "target", target)
        raise ValueError(f"hybrid_attention for head_dim={head_dim} {dtype} needs more than {contract.MAX_SHARED_BYTES} B "
                         f"of shared memory on {arch} with every tile size tried ({'; '.join(tried)}); the "
                         "TensorRT plugin does not support this shape")
    metadata = kernel.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, field, 0):
            raise RuntimeError(f"the compiled kernel needs {field} = {getattr(metadata, field)} bytes, which "
                               "TensorRT's ahead-of-time plugins do not provide")
    ptx = contract.entry_params(kernel.asm["ptx"], contract.AOT_PARAMS)
    version = re.search(r"^\.version\s+(\S+)", ptx, re.M)
    return AotKernel(metadata.name, ptx, metadata.shared, metadata.num_warps, config,
                     version.group(1) if version else "unknown")

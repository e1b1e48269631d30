"""The hybrid-mask attention kernel (plugins/hybrid_attention.py) against the dense-mask reference.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
by conftest.py for the whole session before triton is imported); with one, the same tests run the
compiled kernel on CUDA.
Covered: the in-kernel visibility rule equals `Layout.dense_mask` on every layout kind; the
key-tile schedule covers every visible key, is what the kernel visits (its own tile counter),
and skips most of the new-token square of a b = 16 decode step; outputs equal eager attention
over the dense mask for decode b = 1..16 (and k < b blocks), prefill with a mask block, pure causal, the training
layout, past lengths 0 and > 0 that differ across rows, GQA ratios 1/2/4/8, head dims 64/128
(and a non-power of two), fp32/fp16/bf16, layout scalars as ints or device tensors; outputs are
poisoned with NaN first, so any unwritten element fails. Also bad inputs, and the runtime's
attention="triton" against eager on a tiny model (plus a CUDA-only bf16 check).

Error bounds (|kernel - reference|, values ~ N(0, 1), reference in fp32 from the same rounded
inputs): fp32 2e-5 (only summation order differs), fp16 5e-3 and bf16 3e-2 (the attention
probabilities are rounded to the input dtype before the P @ V product, as in flash attention:
2^-11 and 2^-8 relative, times max |v|).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tidar.plugins import hybrid_attention as kernel
from tidar.plugins.hybrid_attention import _visible
from tidar.runtime.layout import Layout
from tidar.runtime.model import TiDARModel, eager_attention
from tidar.train.checkpoint import init_random_weights, tiny_config

ON_GPU = torch.cuda.is_available()
assert ON_GPU or kernel.INTERPRETED, "without a GPU, conftest.py sets TRITON_INTERPRET=1 before triton is imported"

DEVICE = "cuda" if ON_GPU else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TILE = dict(block_m=16, block_n=16)  # small tiles: several query and key tiles even at test sizes

LAYOUTS = {
    "ar1": Layout.autoregressive(1),
    "causal20": Layout.autoregressive(20),
    "decode1": Layout.decode(1),
    "decode2": Layout.decode(2),
    "decode4": Layout.decode(4),
    "decode8": Layout.decode(8),
    "decode16": Layout.decode(16),
    "decode4k1": Layout.decode(4, 1),  # k of b blocks (docs/design.md §3.4): the same scalars, fewer blocks
    "decode16k3": Layout.decode(16, 3),
    "prefill24+4": Layout.prefill(24, 4),
    "training16/4": Layout.training(16, 4),
    "custom": Layout(causal_len=6, num_blocks=3, block_len=3, first_visible=5, visible_stride=-2),
}


def random_inputs(layout: Layout, past: list[int], heads: int = 2, kv_heads: int = 1, head_dim: int = 64,
                  dtype: torch.dtype = torch.float32, seed: int = 0, slack: int = 3):
    """query/key/value/past_lens for rows with cached lengths `past` (K/V hold `slack` unused slots)."""
    generator = torch.Generator().manual_seed(seed)
    kv_len = max(past) + layout.num_new + slack
    shapes = ((len(past), heads, layout.num_new, head_dim), (len(past), kv_heads, kv_len, head_dim))
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for shape in (shapes[0], shapes[1], shapes[1]))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch.tensor(past, device=DEVICE)


def reference(layout: Layout, q, k, v, past_lens, scale=None) -> torch.Tensor:
    mask = layout.dense_mask(past_lens, k.shape[2])[:, None]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return eager_attention(q.float(), k.float(), v.float(), mask, scale)


def run_kernel(layout: Layout, q, k, v, past_lens, scalars=None, **options) -> torch.Tensor:
    """The kernel into an output poisoned with NaN (an unwritten element cannot pass)."""
    out = torch.full_like(q, float("nan"))
    scalars = layout.kernel_scalars() if scalars is None else scalars
    result = kernel.hybrid_attention(q, k, v, past_lens, **scalars, out=out, **{**TILE, **options})
    assert result is out
    return out


def assert_matches(layout: Layout, q, k, v, past_lens, scale=None, **options) -> None:
    out = run_kernel(layout, q, k, v, past_lens, scale=scale, **options)
    assert torch.isfinite(out).all()
    error = (out.float() - reference(layout, q, k, v, past_lens, scale)).abs().max().item()
    assert error <= TOLERANCE[q.dtype], f"max error {error:.3g} > {TOLERANCE[q.dtype]:.1g} ({q.dtype})"


# ---------------------------------------------------------------- the rule and the tile schedule
@triton.jit(do_not_specialize=["past", "num_new", "kv_len", "causal_len", "num_blocks", "block_len", "first_visible",
                               "visible_stride"])
def _mask_kernel(Out, past, num_new, kv_len, causal_len, num_blocks, block_len, first_visible, visible_stride,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    q = tl.arange(0, BLOCK_Q)[:, None]
    slot = tl.arange(0, BLOCK_K)[None, :]
    seen = _visible(q, slot, past, causal_len, num_blocks, block_len, first_visible, visible_stride)
    tl.store(Out + q * kv_len + slot, seen.to(tl.int8), mask=(q < num_new) & (slot < kv_len))


@pytest.mark.parametrize("name", LAYOUTS)
def test_in_kernel_rule_equals_dense_mask(name):
    layout = LAYOUTS[name]
    for past in (0, 3, 17):
        kv_len = past + layout.num_new + 2
        out = torch.full((layout.num_new, kv_len), -1, dtype=torch.int8, device=DEVICE)
        _mask_kernel[(1,)](out, past, layout.num_new, kv_len, *layout.kernel_scalars().values(),
                           BLOCK_Q=triton.next_power_of_2(layout.num_new), BLOCK_K=triton.next_power_of_2(kv_len))
        expected = layout.dense_mask(torch.tensor([past]), kv_len)[0]
        assert torch.equal(out.cpu().bool(), expected), f"{name}, past {past}"


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("name", LAYOUTS)
def test_key_tile_schedule_covers_every_visible_key(name, block):
    layout = LAYOUTS[name]
    for past in (0, 5, 40):
        kv_len = past + layout.num_new + 1
        mask = layout.dense_mask(torch.tensor([past]), kv_len)[0]
        schedule = kernel.key_tile_schedule(layout.num_new, past, kv_len, block, block, **layout.kernel_scalars())
        assert len(schedule) == -(-layout.num_new // block)
        for index, tiles in enumerate(schedule):
            assert len(set(tiles)) == len(tiles), "a key tile visited twice"
            visited = torch.zeros(kv_len, dtype=torch.bool)
            for start in tiles:
                visited[start:start + block] = True
            rows = mask[index * block:(index + 1) * block]
            assert not (rows & ~visited).any(), f"query tile {index} skips a visible key (past {past})"


def dense_tiles(num_new: int, kv_len: int, block: int) -> int:
    return -(-num_new // block) * -(-kv_len // block)


@pytest.mark.parametrize("past", [0, 40])
def test_decode16_skips_most_key_tiles_and_kernel_visits_the_schedule(past):
    """A b = 16 step (272 new tokens): the schedule visits far fewer tiles than dense attention
    would, the kernel's own counter agrees tile for tile, and the result is right."""
    layout = Layout.decode(16)
    q, k, v, past_lens = random_inputs(layout, [past], heads=1, kv_heads=1, head_dim=16, slack=0)
    kv_len = k.shape[2]
    schedule = kernel.key_tile_schedule(layout.num_new, past, kv_len, 16, 16, **layout.kernel_scalars())
    visited = sum(map(len, schedule))
    prefix_tiles = -(-layout.num_new // 16) * (past // 16)  # tiles every row must see (the cached prefix)
    assert visited - prefix_tiles <= 0.2 * (dense_tiles(layout.num_new, kv_len, 16) - prefix_tiles)
    grid_m = -(-layout.num_new // 16)
    counts = torch.full((1, 1, grid_m), -1, dtype=torch.int32, device=DEVICE)
    assert_matches(layout, q, k, v, past_lens, tile_counts=counts)
    assert counts.flatten().tolist() == [len(tiles) for tiles in schedule]


def test_tile_counts_follow_each_rows_past_length():
    layout = Layout.decode(4)
    q, k, v, past_lens = random_inputs(layout, [0, 33, 9], heads=2, kv_heads=1)
    counts = torch.full((3, 2, 2), -1, dtype=torch.int32, device=DEVICE)
    run_kernel(layout, q, k, v, past_lens, tile_counts=counts)
    for row, past in enumerate([0, 33, 9]):
        schedule = kernel.key_tile_schedule(layout.num_new, past, k.shape[2], 16, 16, **layout.kernel_scalars())
        for head in range(2):
            assert counts[row, head].tolist() == [len(tiles) for tiles in schedule]


# ---------------------------------------------------------------- results against the reference
CASES = [("ar1", [5, 40]), ("causal20", [0, 0]), ("causal20", [7, 31]), ("decode1", [0, 3]), ("decode2", [9, 0]),
         ("decode4", [0, 21]), ("decode8", [35, 2]), ("decode16", [0, 17]), ("decode4k1", [6, 0]),
         ("decode16k3", [23, 4]), ("prefill24+4", [0, 13]),
         ("training16/4", [0]), ("custom", [4, 19])]


@pytest.mark.parametrize("name,past", CASES, ids=[f"{name}-past{'/'.join(map(str, past))}" for name, past in CASES])
def test_layouts_match_dense_reference(name, past):
    layout = LAYOUTS[name]
    assert_matches(layout, *random_inputs(layout, past, seed=len(past) + sum(past)))


def random_layout(generator: torch.Generator) -> Layout:
    """A random valid layout (any sizes, first_visible and stride, including negative strides)."""
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    while True:
        causal_len, num_blocks = draw(1, 12), draw(0, 4)
        try:
            return Layout(causal_len, num_blocks, draw(1, 5) if num_blocks else 0, draw(0, causal_len), draw(-3, 3))
        except ValueError:
            continue


def test_random_layouts_match_dense_reference():
    generator = torch.Generator().manual_seed(2024)
    for case in range(12):
        layout = random_layout(generator)
        past = torch.randint(0, 40, (3,), generator=generator).tolist()
        assert_matches(layout, *random_inputs(layout, past, head_dim=16, seed=case))


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_gqa_ratios(ratio):
    layout = Layout.decode(4)
    assert_matches(layout, *random_inputs(layout, [6, 29], heads=8, kv_heads=8 // ratio, head_dim=32, seed=ratio))


@pytest.mark.parametrize("head_dim", [64, 128, 48])
def test_head_dims(head_dim):
    layout = Layout.decode(2)
    assert_matches(layout, *random_inputs(layout, [12, 30], head_dim=head_dim, seed=head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(dtype):
    layout = Layout.decode(4)
    assert_matches(layout, *random_inputs(layout, [3, 26], dtype=dtype, seed=1))


def test_custom_scale_default_tiles_and_strided_query():
    """A non-default scale, the launcher's own tile sizes, and a query that is a transposed view
    (the model's [B, Q, heads, D] -> [B, heads, Q, D])."""
    layout = Layout.prefill(9, 3)
    q, k, v, past_lens = random_inputs(layout, [0, 11], heads=4, kv_heads=2, head_dim=32)
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    out = kernel.hybrid_attention(strided, k, v, past_lens, **layout.kernel_scalars(), scale=0.3)
    assert (out - reference(layout, q, k, v, past_lens, 0.3)).abs().max() <= TOLERANCE[torch.float32]


def test_layout_scalars_as_device_tensors_and_int32_past_lens():
    """TensorRT passes the layout as 0-d tensors (the kernel loads them) and may use int32."""
    layout = Layout.decode(3)
    q, k, v, past_lens = random_inputs(layout, [8, 1])
    as_ints = run_kernel(layout, q, k, v, past_lens)
    for dtype in (torch.int64, torch.int32):
        scalars = {name: torch.tensor(value, dtype=dtype, device=DEVICE)
                   for name, value in layout.kernel_scalars().items()}
        as_tensors = run_kernel(layout, q, k, v, past_lens.to(dtype), scalars=scalars)
        assert torch.equal(as_tensors, as_ints)


@pytest.mark.parametrize("b,k", [(4, 1), (8, 3), (16, 2)])
def test_trtllm_front_end_at_k_of_b_shapes(b, k):
    """The TensorRT-LLM plugin's eager path (the launcher its engine calls) on a k-of-b step
    (docs/design.md §3.4): the layout scalars are inputs, so Layout.decode(b, k) travels as five
    0-d tensors and the result equals the dense reference."""
    from tidar.plugins.trtllm_plugin import hybrid_attention_trtllm

    layout = Layout.decode(b, k)
    q, key, v, past_lens = random_inputs(layout, [5, 19], heads=4, kv_heads=2, head_dim=32, seed=b + k)
    scalars = [torch.tensor(value, device=DEVICE) for value in layout.kernel_scalars().values()]
    out = hybrid_attention_trtllm(q, key, v, past_lens, *scalars, num_heads=4, num_kv_heads=2, head_dim=32,
                                  scale=32 ** -0.5)
    assert (out.float() - reference(layout, q, key, v, past_lens)).abs().max() <= TOLERANCE[torch.float32]


def test_rows_without_visible_keys_are_finite():
    """No valid layout leaves a row without keys; an empty cache forces it: zeros, not NaN."""
    layout = Layout.decode(2)
    q, k, v, past_lens = random_inputs(layout, [0, 0], slack=0)
    out = run_kernel(layout, q, k[:, :, :0], v[:, :, :0], past_lens)
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- bad inputs
def _bad(case: str):
    layout = Layout.decode(2)
    q, k, v, past_lens = random_inputs(layout, [1, 2], heads=4, kv_heads=2, head_dim=16)
    scalars = layout.kernel_scalars()
    args = dict(query=q, key=k, value=v, past_lens=past_lens)
    options = {}
    if case == "query rank":
        args["query"] = q[0]
    elif case == "value shape":
        args["value"] = v[:, :, 1:]
    elif case == "key head_dim":
        args["key"] = k[..., :8]
    elif case == "gqa":
        args["query"] = q[:, :3]
    elif case == "key dtype":
        args["key"] = k.half()
    elif case == "query dtype":
        args = {name: t.double() if name != "past_lens" else t for name, t in args.items()}
    elif case == "past_lens dtype":
        args["past_lens"] = past_lens.float()
    elif case == "past_lens shape":
        args["past_lens"] = past_lens[:1]
    elif case == "scalar type":
        scalars["block_len"] = 2.0
    elif case == "scalar shape":
        scalars["causal_len"] = torch.tensor([2], device=DEVICE)
    elif case == "layout size":
        scalars["num_blocks"] = 3
    elif case == "scale":
        options["scale"] = -1.0
    elif case == "out":
        options["out"] = torch.empty_like(q[:, :2])
    return dict(**args, **scalars, **options)


@pytest.mark.parametrize("case,message", [
    ("query rank", "query has shape (4, 6, 16)"),
    ("value shape", "value has kv_len="),
    ("key head_dim", "key has head_dim=8"),
    ("gqa", "query has 3 heads, not a multiple of the 2 heads of key/value"),
    ("key dtype", "key has dtype float16; expected float32"),
    ("query dtype", "query has dtype float64"),
    ("past_lens dtype", "past_lens has dtype float32"),
    ("past_lens shape", "past_lens has batch=1"),
    ("scalar type", "block_len must be an int"),
    ("scalar shape", "causal_len must be an int or a 0-d"),
    ("layout size", "query has 6 new tokens but the layout"),
    ("scale", "scale must be a finite number > 0, got -1.0"),
    ("out", "out must be a float32 tensor of shape (2, 4, 6, 16)"),
])
def test_bad_inputs_raise_clear_errors(case, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernel.hybrid_attention(**_bad(case))


# ---------------------------------------------------------------- the runtime's attention="triton"
def tiny_model(family: str = "qwen3", dtype: torch.dtype = torch.float32) -> TiDARModel:
    model = TiDARModel(tiny_config(family, vocab_size=64))
    init_random_weights(model, seed=0)
    return model.to(device=DEVICE, dtype=dtype).eval()


@torch.no_grad()
def decode_step_logits(model: TiDARModel, layout: Layout, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Logits of one step over rows with different cached lengths, for eager and triton attention."""
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 64, (len(lengths), max(lengths)), generator=generator).to(DEVICE)
    new = torch.randint(0, 64, (len(lengths), layout.num_new), generator=generator).to(DEVICE)
    cache = model.new_cache(len(lengths), max(lengths) + layout.num_new)
    model.set_attention("eager")
    for row, length in enumerate(lengths):
        view = cache.row(row)
        model(prefix[row:row + 1, :length], Layout.autoregressive(length), view)
        view.commit([length])
    logits = {}
    for attention in ("eager", "triton"):
        model.set_attention(attention)
        logits[attention] = model(new, layout, cache).float()
    return logits


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_model_attention_triton_matches_eager(family):
    logits = decode_step_logits(tiny_model(family), Layout.decode(4), [9, 3])
    assert (logits["triton"] - logits["eager"]).abs().max() <= 1e-4


def test_model_attention_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    model = TiDARModel(tiny_config("qwen2", vocab_size=64), attention="triton")
    monkeypatch.setattr(kernel, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        model(torch.zeros(1, 3, dtype=torch.long), Layout.autoregressive(3))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 kernel against eager on the device)")
def test_cuda_model_bf16_decode16_matches_eager():
    logits = decode_step_logits(tiny_model("qwen3", torch.bfloat16), Layout.decode(16), [40, 7])
    scale = logits["eager"].abs().max()
    assert (logits["triton"] - logits["eager"]).abs().max() <= 3e-2 * scale


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (device buffers as the TensorRT front ends pass them)")
def test_cuda_tensor_from_pointer_views_the_buffer():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64):
        source = torch.arange(24, device="cuda").to(dtype).reshape(2, 3, 4)
        view = kernel.tensor_from_pointer(source.data_ptr(), source.shape, str(dtype).removeprefix("torch."))
        assert view.dtype == dtype and view.data_ptr() == source.data_ptr() and torch.equal(view, source)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (the decode loop on the device against the CPU run)")
@pytest.mark.parametrize("attention", ["eager", "sdpa", "triton"])
def test_cuda_decode_engine_greedy_equals_the_cpu_run(tiny_checkpoints, attention):
    """DecodeEngine on CUDA through the torch backend, float32 with TF32 off: the same greedy
    tokens as on the CPU, AR and TiDAR (b = 4)."""
    from tidar.export.verify import greedy_mismatch
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.tokenizer import Tokenizer

    path = tiny_checkpoints["qwen2"]
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = load_backend("torch", path, dtype="float32")
    gpu = load_backend("torch", path, dtype="float32", attention=attention, device="cuda")
    assert greedy_mismatch(cpu, gpu, Tokenizer(path), (0, 4)) is None

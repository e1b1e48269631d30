"""The sizes an engine is built for, in plain Python (no TensorRT needed, tested on CPU).

Both engine flows take the decode step of `export/onnx_export.py` with three dynamic dimensions:

    batch   rows of a step                         1 .. max_batch_size
    new     new tokens per row: a prefill is the   1 .. max(max_input_len + draft_len, step tokens)
            prompt plus a block of masks, a decode
            step `Layout.decode(draft_len,
            draft_blocks).num_new` = b + k*b
    past    cached tokens per row (padded maximum) 0 .. max_position_embeddings

`engine_limits` gives the trtllm-build sizes, `dimension_ranges` the (min, opt, max) of each
dynamic dimension (TensorRT optimization profile / TensorRT-LLM `dim_range`), and
`input_shapes` the (min, opt, max) shape of every graph input, as TensorRT's
`IOptimizationProfile.set_shape` wants them. `recorded_batch_limit` reads the rows an engine was
built for back from its manifest record, and `serving_batch_sizes` turns it into the serving
parameters a repository rendered for that engine gets (every batch it runs fits the profile). `opt` is what kernels are tuned for: one row, one
TiDAR decode step of `draft_len` b drafts and `draft_blocks` k mask blocks (None: k = b, the
paper's b(b+1) tokens; docs/design.md §3.4), a past of up to OPT_PAST tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidar.runtime.config import TiDARConfig
from tidar.runtime.layout import Layout

ENGINE_MAX_BATCH_SIZE = 8
OPT_PAST = 1024
LAYOUT_SCALARS = ("causal_len", "num_blocks", "block_len", "first_visible", "visible_stride")


@dataclass(frozen=True)
class DimRange:
    """(min, opt, max) of one dynamic dimension."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"dimension range needs 0 <= min <= opt <= max, got {self}")

    def as_tuple(self) -> tuple[int, int, int]:
        return self.min, self.opt, self.max


def max_past(config: TiDARConfig) -> int:
    """The most cached tokens a row can have when a step runs: the model's context length. The
    one definition both engine flows use (TensorRT profile and TensorRT-LLM's max_seq_len)."""
    return config.max_position_embeddings


def step_tokens(draft_len: int, draft_blocks: int | None = None) -> int:
    """New tokens per row of one decode step of shape (b, k): b + k*b (k = None: k = b)."""
    return Layout.decode(draft_len, draft_blocks).num_new


def max_past_for_seq_len(max_seq_len: int, draft_len: int, draft_blocks: int | None = None) -> int:
    """The past that `max_seq_len` (cached tokens plus one decode step, as `engine_limits` sets
    it for trtllm-build) leaves."""
    return max_seq_len - step_tokens(draft_len, draft_blocks)


def engine_limits(config: TiDARConfig, draft_len: int, max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
                  draft_blocks: int | None = None) -> dict[str, int]:
    """trtllm-build sizes: a prefill is the prompt plus a block of masks, a decode step
    `step_tokens(draft_len, draft_blocks)` tokens per row, and the KV cache holds the committed
    tokens plus one step's new tokens."""
    step = step_tokens(draft_len, draft_blocks)
    max_input_len = config.max_position_embeddings - 1
    return {"max_batch_size": max_batch_size, "max_input_len": max_input_len,
            "max_seq_len": max_past(config) + step,
            "max_num_tokens": max(max_input_len + draft_len, max_batch_size * step)}


def dimension_ranges(config: TiDARConfig, draft_len: int, max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
                     draft_blocks: int | None = None) -> dict[str, DimRange]:
    """{"batch", "new", "past"}: the (min, opt, max) of each dynamic dimension."""
    limits = engine_limits(config, draft_len, max_batch_size, draft_blocks)
    return ranges_for_limits(max_batch_size, limits["max_input_len"],
                             max_past_for_seq_len(limits["max_seq_len"], draft_len, draft_blocks), draft_len,
                             draft_blocks)


def ranges_for_limits(max_batch_size: int, max_input_len: int, max_past: int, draft_len: int,
                      draft_blocks: int | None = None) -> dict[str, DimRange]:
    """The ranges of `dimension_ranges` from explicit limits: at most `max_batch_size` rows, a
    prefill of up to `max_input_len` prompt tokens plus `draft_len` masks, `max_past` cached
    tokens; tuned for one row, one decode step of shape (`draft_len`, `draft_blocks`)."""
    step = step_tokens(draft_len, draft_blocks)
    max_new = max(max_input_len + draft_len, step)
    return {"batch": DimRange(1, 1, max_batch_size),
            "new": DimRange(1, min(step, max_new), max_new),
            "past": DimRange(0, min(OPT_PAST, max_past), max_past)}


def input_shapes(config: TiDARConfig, draft_len: int, num_kv_heads: int | None = None,
                 max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
                 draft_blocks: int | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min shape, opt shape, max shape)} of the decode-step graph (input names of
    `onnx_export.input_names`); `num_kv_heads` is the rank-local count (default: all)."""
    ranges = dimension_ranges(config, draft_len, max_batch_size, draft_blocks)
    kv_heads = num_kv_heads or config.num_key_value_heads

    def shapes(*dims) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(ranges[d].as_tuple()[i] if isinstance(d, str) else d for d in dims) for i in range(3))

    found = {"input_ids": shapes("batch", "new"), "past_lens": shapes("batch"),
             **{name: shapes() for name in LAYOUT_SCALARS}}
    for layer in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            found[f"past_{kind}_{layer}"] = shapes("batch", kv_heads, "past", config.head_dim)
    return found


def recorded_batch_limit(record: dict, step: str = "engine") -> int:
    """The most rows the engine of manifest record `record` (manifest.json `engines[step]`) was
    built for: `max_batch_size` (both flows record it; a TensorRT record of an older build has
    only its profile's `batch` range)."""
    if "max_batch_size" in record:
        limit = record["max_batch_size"]
    elif "batch" in record.get("profile", {}):
        limit = record["profile"]["batch"][2]
    else:
        raise ValueError(f"manifest.json engines[{step!r}] records no max_batch_size and no profile batch range: "
                         "the rows it was built for are unknown")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"manifest.json engines[{step!r}]: max_batch_size {limit!r} is not a positive integer")
    return limit


def serving_batch_sizes(limit: int, max_batch_size: int, autotune_batch_sizes: tuple[int, ...]
                        ) -> tuple[int, tuple[int, ...]]:
    """(max_batch_size, autotune_batch_sizes) of a repository serving an engine of `limit` rows,
    from the defaults given: no more rows than the engine takes, autotuned up to that batch."""
    rows = min(max_batch_size, limit)
    return rows, tuple(sorted({b for b in autotune_batch_sizes if b <= rows} | {rows}))

"""CUDA graphs for the torch backend's decode steps: one captured forward per (batch bucket,
layout, attended KV width).

A decode step on a GPU launches a few hundred small kernels; at small batches the host's time to
launch them is most of the step. A CUDA graph records the launches once and replays them with one
call. A graph fixes every shape and address, so `GraphedForward` runs the step on static buffers:

- the batch is padded up to a *bucket*: the powers of two below the cache's `max_rows`, then
  `max_rows` itself (`batch_buckets`). Powers of two bound the graphs to log2(max_rows) + 1 per
  layout while a padded step does less than twice its rows' work; a bucket never exceeds
  `max_rows` because the padded rows need storage rows of their own (`KVCache.padded`): they have
  a past length of 0, write their K/V into free storage rows, and their outputs are dropped;
- attention spans a fixed number of slots instead of the longest row (`TiDARModel.plan`'s
  `kv_len`), so the step's shape does not change as rows grow; the mask hides every slot after a
  row's new tokens, so the output is the same. The Triton kernel skips the hidden tiles, so its
  graphs span the whole capacity (one graph per batch bucket and layout); the dense lowerings
  (eager, SDPA) do the work of every attended slot, so theirs span a *KV bucket*: the powers of
  two from KV_BUCKET_FLOOR below the capacity, then the capacity (`kv_buckets`), the smallest
  that holds the longest row's past and new tokens — at most twice the slots needed, one graph
  more per doubling of the capacity;
- input ids and past lengths are copied into static tensors before each replay; the hidden states
  come out of the graph's static output, copied (`clone`) before the next replay can overwrite it.

Only decode layouts (`is_decode_layout`: AR steps and TiDAR steps of any draft length) on a whole
cache are graphed, each captured on first use, or all at once ahead of use: `prepare(cache,
layouts)` captures every (bucket, layout) of a cache, largest bucket first (as vLLM captures its
batch sizes at start-up: the largest graph sizes the shared pool, the smaller ones fit in it), and
`freeze()` then stops capturing: a step without a graph runs eagerly (`uncaptured_steps` counts
them), so a server that prepared its graphs before reporting ready never captures while serving
(serving/requests.py `build_scheduler`). A prefill (one row view, a prompt-length layout)
stays eager. The graphs of a cache are dropped when its storage is reallocated (`KVCache.grow`
bumps `allocations`) or when the cache is garbage collected; all graphs are dropped when the model
changes (attention implementation, dtype, device or weight storage; weights overwritten in place
need nothing, a replay reads them). `invalidate()` drops them explicitly.

Capture is a thin layer: `GraphedForward` hands a zero-argument step to its `capture` function and
gets back a replay function. `CudaGraphCapture` captures a `torch.cuda.CUDAGraph` following the
PyTorch CUDA-graph notes (warm-up iterations on a side stream, capture on that same stream, one
memory pool shared by every graph of the forward); `call_directly` runs the step itself at every
"replay", which is how the padding, bucketing and full-capacity attention are tested on a CPU.

The shared pool: PyTorch documents pool sharing as safe for graphs replayed in their capture order;
these are replayed in any order, which is safe here because nothing outlives a replay but the
cache writes (to the cache's own storage, outside the pool) and the output, which is copied out
before the next replay. Replays must not overlap (one decode loop per backend, as everywhere).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from tidar.runtime.cache import KVCache
from tidar.runtime.layout import Layout
from tidar.runtime.model import TiDARModel

Step = Callable[[], torch.Tensor]
Capture = Callable[[Step], Step]
"""Takes a zero-argument step computing on static buffers; returns its replay."""

GRAPHABLE_ATTENTION = ("eager", "sdpa", "triton")
"""Attention implementations whose forward launches no host synchronisation and no compilation
(flex builds a block mask per step; flex-compiled compiles)."""

WARMUP_STEPS = 3
"""Eager runs of a step on the capture stream before its capture (lazy library initialisation,
Triton compilation and cuBLAS workspaces happen outside the capture)."""


def batch_buckets(max_rows: int) -> list[int]:
    """The padded batch sizes for a cache of `max_rows` rows: powers of two below it, then itself."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    buckets = []
    size = 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return buckets + [max_rows]


KV_BUCKET_FLOOR = 256
"""The smallest KV bucket of the dense lowerings' graphs (slots)."""


def kv_buckets(capacity: int) -> list[int]:
    """The attended widths of a cache of `capacity` slots: powers of two from KV_BUCKET_FLOOR below
    it, then the capacity itself."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    buckets, size = [], KV_BUCKET_FLOOR
    while size < capacity:
        buckets.append(size)
        size *= 2
    return buckets + [capacity]


def kv_bucket(needed: int, capacity: int) -> int:
    """The smallest of `kv_buckets(capacity)` that holds `needed` slots."""
    if not 1 <= needed <= capacity:
        raise ValueError(f"{needed} slots are outside [1, capacity = {capacity}]")
    return next(size for size in kv_buckets(capacity) if size >= needed)


def batch_bucket(batch: int, max_rows: int) -> int:
    """The bucket a batch of `batch` rows is padded to: the smallest of `batch_buckets` that holds it."""
    if not 1 <= batch <= max_rows:
        raise ValueError(f"batch {batch} is outside [1, max_rows = {max_rows}]")
    return next(size for size in batch_buckets(max_rows) if size >= batch)


def is_decode_layout(layout: Layout) -> bool:
    """Whether `layout` is a decode step: AR (one causal token) or TiDAR (b drafts, then mask
    blocks of b, block j seeing the first j + 1 drafts; any number of blocks up to b). A prefill's
    layout spans its prompt and is never one (unless the prompt is a single token at draft length
    0, where it is the AR step)."""
    if layout.num_blocks == 0:
        return layout.causal_len == 1
    return (layout.block_len == layout.causal_len and layout.first_visible == 1 and layout.visible_stride == 1
            and layout.num_blocks <= layout.causal_len)


def check_graphable(model: TiDARModel) -> None:
    """Raise ValueError, naming the option, unless `model`'s decode steps can be captured."""
    if model.attention not in GRAPHABLE_ATTENTION:
        raise ValueError(f"cuda_graphs: attention {model.attention!r} cannot be captured in a CUDA graph; use one of "
                         f"{', '.join(GRAPHABLE_ATTENTION)}, or turn CUDA graphs off")


def graphed_forward(model: TiDARModel, cuda_graphs: bool | None = None) -> "GraphedForward | None":
    """The torch backend's option `cuda_graphs`: None = graphs when the model is on a CUDA device
    and its attention can be captured, True = graphs (ValueError naming the option on a CPU or
    with such attention), False = none."""
    if cuda_graphs is None:
        cuda_graphs = model.device.type == "cuda" and model.attention in GRAPHABLE_ATTENTION
    if not cuda_graphs:
        return None
    if model.device.type != "cuda":
        raise ValueError(f"cuda_graphs: CUDA graphs need the model on a CUDA device; it is on {model.device} "
                         "(turn them off, or load the model on cuda)")
    return GraphedForward(model)


def call_directly(step: Step) -> Step:
    """The capture layer without CUDA graphs: every replay runs `step` eagerly (tests, CPU)."""
    return step


class CudaGraphCapture:
    """Captures steps into `torch.cuda.CUDAGraph`s on one side stream, sharing one memory pool."""

    def __init__(self, device: torch.device, warmup_steps: int = WARMUP_STEPS):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        self.warmup_steps = warmup_steps
        self.stream = torch.cuda.Stream(self.device)
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, step: Step) -> Step:
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)  # the static inputs were written on the current stream
            with torch.cuda.stream(self.stream):
                for _ in range(self.warmup_steps):
                    step()
            current.wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                output = step()

        def replay() -> torch.Tensor:
            graph.replay()  # on the current stream of the capture's device
            return output

        return replay


@dataclass
class _Graph:
    """One captured step: its static inputs and its replay."""

    input_ids: torch.Tensor  # [bucket, num_new]
    past_lens: torch.Tensor  # [bucket]
    replay: Step  # -> hidden states [bucket, num_new, hidden]


@dataclass
class _CacheGraphs:
    """The graphs of one cache, valid while its storage allocation is `allocation`."""

    allocation: int
    graphs: dict[tuple[int, Layout, int], _Graph] = field(default_factory=dict)
    """(batch bucket, layout, attended slots) -> graph."""


class GraphedForward:
    """`TiDARModel.hidden_states` of decode steps, run as one graph per (batch bucket, layout,
    attended KV width)."""

    def __init__(self, model: TiDARModel, capture: Capture | None = None):
        """`capture` defaults to `CudaGraphCapture` on the model's device; `call_directly` runs the
        same padded, full-capacity computation without graphs."""
        check_graphable(model)
        self.model = model
        self.capture = capture if capture is not None else CudaGraphCapture(model.device)
        self.captures = 0
        """Steps captured (one per (cache storage, batch bucket, layout) used)."""
        self.replays = 0
        """Forwards run through a captured step."""
        self.frozen = False
        """No capture any more (`freeze`): steps without a graph run eagerly."""
        self.uncaptured_steps = 0
        """Decode steps run eagerly after `freeze` because no graph of theirs was prepared."""
        self._model_state = self._model_signature()
        self._caches: weakref.WeakKeyDictionary[KVCache, _CacheGraphs] = weakref.WeakKeyDictionary()

    def handles(self, layout: Layout, cache: KVCache | None) -> bool:
        """Whether a forward of `layout` on `cache` runs here (else the caller runs it eagerly):
        a decode layout on a whole, non-empty cache; once frozen, only one with a graph."""
        if cache is None or cache.is_view or cache.batch == 0 or not is_decode_layout(layout):
            return False
        if self.frozen and self._key(cache, layout) not in self._graphs_of(cache):
            self.uncaptured_steps += 1
            return False
        return True

    def attended_widths(self, capacity: int) -> list[int]:
        """The slots a graph of a cache of `capacity` may attend over (see the module docstring)."""
        return [capacity] if self.model.attention == "triton" else kv_buckets(capacity)

    def _key(self, cache: KVCache, layout: Layout) -> tuple[int, Layout, int]:
        """(batch bucket, layout, attended slots) of a step of `layout` on `cache` now."""
        needed = cache.max_length() + layout.num_new  # host-side, as the eager plan checks it
        if needed > cache.capacity:
            raise ValueError(f"KV cache capacity {cache.capacity} is too small for {needed} slots")
        width = cache.capacity if self.model.attention == "triton" else kv_bucket(needed, cache.capacity)
        return batch_bucket(cache.batch, cache.max_rows), layout, width

    def freeze(self) -> None:
        """Capture nothing from now on (see the module docstring)."""
        self.frozen = True

    @torch.inference_mode()
    def prepare(self, cache: KVCache, layouts) -> int:
        """Capture the step of every decode layout of `layouts` at every batch bucket of `cache`
        (`batch_buckets(cache.max_rows)`) and attended width (`attended_widths`), largest first,
        before any row joins it; returns
        how many graphs were captured (those already there are kept). The capture runs on free
        storage rows with past length 0 (what a padded row does), so the cache's contents do not
        matter and nothing is committed."""
        if cache.is_view:
            raise ValueError("graphs are prepared on a whole cache, not a view")
        if self.frozen:
            raise ValueError("prepare() after freeze(): the graphs of a served model are all captured before it is")
        layouts = list(dict.fromkeys(layouts))
        refused = [layout for layout in layouts if not is_decode_layout(layout)]
        if refused:
            raise ValueError(f"only decode layouts are graphed; not {refused[0]}")
        if any(layout.num_new > cache.capacity for layout in layouts):
            raise ValueError(f"KV cache capacity {cache.capacity} is too small for a step of "
                             f"{max(layout.num_new for layout in layouts)} tokens")
        graphs, before = self._graphs_of(cache), self.captures
        for bucket in reversed(batch_buckets(cache.max_rows)):
            for width in reversed(self.attended_widths(cache.capacity)):
                for layout in layouts:
                    if layout.num_new <= width and (bucket, layout, width) not in graphs:
                        graphs[(bucket, layout, width)] = self._capture(cache, bucket, layout, None, width)
        return self.captures - before

    def invalidate(self) -> None:
        """Drop every graph (they are captured again on next use)."""
        self._caches = weakref.WeakKeyDictionary()

    def _model_signature(self) -> tuple:
        weight = self.model.model.embed_tokens.weight
        return self.model.attention, weight.dtype, weight.device, weight.data_ptr()

    def _graphs_of(self, cache: KVCache) -> dict[tuple[int, Layout, int], _Graph]:
        state = self._model_signature()
        if state != self._model_state:
            check_graphable(self.model)
            self.invalidate()
            self._model_state = state
        entry = self._caches.get(cache)
        if entry is None or entry.allocation != cache.allocations:  # new cache, or its storage was reallocated
            entry = self._caches[cache] = _CacheGraphs(cache.allocations)
        return entry.graphs

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Hidden states [batch, num_new, hidden] of the new tokens (K/V written into `cache`,
        uncommitted), as `TiDARModel.hidden_states(input_ids, layout, cache)`."""
        if not self.handles(layout, cache):
            raise ValueError(f"a graphed forward needs a decode layout on a whole, non-empty cache; got {layout} "
                             f"on a {'view of a ' if cache is not None and cache.is_view else ''}cache")
        batch = cache.batch
        if tuple(input_ids.shape) != (batch, layout.num_new):
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}; the batch of {batch} rows and the layout "
                             f"need ({batch}, {layout.num_new})")
        key = self._key(cache, layout)
        graphs = self._graphs_of(cache)
        graph = graphs.get(key)
        if graph is None:
            if self.frozen:
                raise ValueError(f"no graph of batch bucket {key[0]}, {layout}, {key[2]} slots was prepared and capture "
                                 "is frozen; ask handles() first (it sends such a step to the eager path)")
            graph = graphs[key] = self._capture(cache, key[0], layout, input_ids, key[2])
        else:
            self._load(graph, input_ids, cache)
        hidden = graph.replay()
        self.replays += 1
        return hidden[:batch].clone()

    @staticmethod
    def _load(graph: _Graph, input_ids: torch.Tensor | None, cache: KVCache) -> None:
        """Copy the step's inputs into the static buffers: the padded rows get a past of 0 (their
        input ids are whatever is there: valid ids, never read back). None: a step prepared ahead
        of use, every row padded (ids 0, past 0)."""
        if input_ids is None:
            graph.input_ids.zero_()
            graph.past_lens.zero_()
            return
        batch = cache.batch
        graph.input_ids[:batch].copy_(input_ids)
        graph.past_lens[:batch].copy_(cache.lengths)
        graph.past_lens[batch:].zero_()

    def _capture(self, cache: KVCache, bucket: int, layout: Layout, input_ids: torch.Tensor | None,
                 width: int) -> _Graph:
        device = cache.device
        graph = _Graph(torch.zeros(bucket, layout.num_new, dtype=torch.long, device=device),
                       torch.zeros(bucket, dtype=torch.long, device=device), replay=None)
        self._load(graph, input_ids, cache)
        padded, model = cache.padded(bucket), self.model
        static_ids, static_past = graph.input_ids, graph.past_lens

        def step() -> torch.Tensor:
            return model.hidden_states(static_ids, layout, padded, past_lens=static_past, kv_len=width)

        try:
            graph.replay = self.capture(step)
        except Exception as error:
            raise RuntimeError(f"capturing the decode step (batch bucket {bucket}, {layout}, {width} slots) in a CUDA "
                               f"graph failed: "
                               f"{error}; turn CUDA graphs off (tidar generate --no-cuda-graphs, serving parameter "
                               f"cuda_graphs=false)") from error
        self.captures += 1
        return graph

"""The ONNX graph of one TiDAR forward (decode step, prefill or AR step) over a KV cache.

`export_decode_step(model, path)` writes one graph that serves every `Layout`: the layout is a
runtime input, so the same file runs prefill, TiDAR decode steps of any draft length and plain
AR decoding. `export_decode_steps(config, chunks, graphs, weights_path, head_path)` writes several
lowerings of one checkpoint without ever holding its weights (what `tidar-export build` uses).

The decode step ends at the final norm: it outputs hidden states, and the LM head is a graph of
its own (`head_path`, onnx/lm_head.onnx in a build), which the runtime runs on the rows it needs
only: the verification rows, then the masks of the block the verification picked
(docs/design.md §3.2 "Logits only where needed", §3.8). A step's second set of rows depends on
the first's verification, so a single graph could produce them only with verification inside it.

Graph inputs (both lowerings)
    input_ids        int64 [batch, new]                  the new tokens of the layout
    past_lens        int64 [batch]                       each row's cached length
    causal_len, num_blocks, block_len, first_visible, visible_stride
                     int64 []                            `Layout.kernel_scalars()`
    past_key_{i}, past_value_{i}
                     float [batch, kv_heads, past, head_dim]   per layer; any past >=
                                                         max(past_lens): slots from past_lens[r]
                                                         on are never read
Graph outputs, "standard" lowering (ONNX Runtime)
    hidden_states    float [batch, new, hidden]          final-norm hidden states (the graph's dtype)
    new_key_{i}, new_value_{i}
                     float [batch, kv_heads, new, head_dim]    the new tokens' K/V only
Graph outputs, "plugin" lowering (TensorRT)
    hidden_states    as above
    present_key_{i}, present_value_{i}
                     float [batch, kv_heads, past + new, head_dim]

The LM-head graph
    input   hidden_states  float [batch, rows, hidden]   rows picked from the decode step's output
    output  logits         float32 [batch, rows, vocab]
    weight  lm_head.weight, or the embedding when embeddings are tied (`source.head_weight_source`)

Slot convention (the one of runtime/cache.py): the new tokens of row r belong at slots
past_lens[r] .. past_lens[r] + new - 1. The standard graph never copies the cache: it attends
over the `past` inputs as they are (slots below past_lens[r] visible, the rest masked) and over
the new tokens' own K/V, and returns only those, so a runtime can hand it its whole cache
in place, without a copy, and store the `new_*` outputs at those slots itself (O(new tokens)
per step; runtime/backends/onnx_backend.py, docs/design.md §3.8). The plugin graph writes the
new K/V into `present` (`past` followed by `new` free slots, a row shorter than the padded past
overwriting its padding; slots past past_lens[r] + new hold whatever `past` held there), the
contract of the TensorRT plugin. Dynamic axes: batch, new and past.

Position ids and the hybrid mask are computed inside the graph from past_lens and the layout
scalars with the same code as the runtime (`runtime.layout.position_offset` / `visible`), and
the rest of the forward is the reference model's own `TiDARModel.hidden_states`, so the graph
cannot drift from the runtime. Two lowerings of attention:

- "standard": boolean masks and eager attention (MatMul, Where, Softmax, ...) in two parts, the
  cached slots and the new tokens, one softmax over both; grouped-query heads share their K/V
  without expanding it: plain ONNX that ONNX Runtime runs (runtime/backends/onnx_backend.py).
- "plugin": one `tidar::hybrid_attention` node per layer with inputs (query [B, heads, new, D],
  key and value [B, kv_heads, past + new, D] with the new tokens already written, past_lens and
  the five layout scalars) and attributes num_heads, num_kv_heads, head_dim, scale; its output
  is the attention output [B, heads, new, D]. This is the signature of the TensorRT plugin
  `tidar::hybrid_attention`; ONNX Runtime cannot run the node.

Exporter: torch.onnx.export with dynamo=True (torch.export + onnxscript), the default and
maintained path of torch 2.13. Dynamic dimensions are declared with `torch.export.Dim`; the
plugin node is a `torch.library` custom op (whose eager body is the standard lowering, so
tracing has a reference implementation) translated to the custom-domain node through
`custom_translation_table`.

Weights: the graph is traced from `placeholder_model`, whose parameters are zero scalars expanded
to their shapes (no memory), then optimised by onnxscript with the weights left out of constant
folding (a weight is never turned into a derived constant, e.g. a pre-transposed copy: the graph
keeps the Transpose). The weights are then written once, tensor by tensor (row chunks converted
to the graph's dtype), to an external-data file in the graph's folder, and every graph of that
folder points its initializers at it, so the standard graph, the plugin graph and the LM-head
graph share one copy (a tied head reads the embedding's bytes). Only the RoPE table and small
shape constants stay inside the graph files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..runtime.config import TiDARConfig
from ..runtime.layout import Layout, position_offset, visible
from ..runtime.model import AttentionPlan, TiDARModel, eager_attention

ATTENTION_LOWERINGS = ("standard", "plugin")
LAYOUT_SCALARS = ("causal_len", "num_blocks", "block_len", "first_visible", "visible_stride")
PLUGIN_DOMAIN = "tidar"
PLUGIN_OP = "hybrid_attention"
DEFAULT_OPSET = 18
"""The opset of the LM-head graph and of the plugin lowering (TensorRT's ONNX parser)."""
LOWERING_OPSETS = {"standard": 23, "plugin": DEFAULT_OPSET}
"""Each lowering's opset when none is given. The standard graph (ONNX Runtime) is opset 23, so
onnxscript's ONNX fusions turn each RMS norm (7 nodes) into one RMSNormalization and each rotary
embedding into one RotaryEmbedding: 575 -> 444 nodes in a 6-layer graph, whose steps on the CPU
are dominated by per-node costs at small batches (docs/design.md §3.8)."""


def input_names(num_layers: int) -> list[str]:
    """Names of the graph inputs, in order."""
    return ["input_ids", "past_lens", *LAYOUT_SCALARS, *_per_layer("past", num_layers)]


HIDDEN_STATES = "hidden_states"
"""The decode step's first output and the LM-head graph's input."""
LOGITS = "logits"
"""The LM-head graph's output (float32)."""


NEW_KV = "new"
"""Prefix of the standard graph's per-layer K/V outputs (new_key_i, new_value_i)."""
PRESENT_KV = "present"
"""Prefix of the plugin graph's per-layer K/V outputs (present_key_i, present_value_i)."""


def output_names(num_layers: int, attention: str = "standard") -> list[str]:
    """Names of the outputs of the `attention` lowering's graph, in order."""
    return [HIDDEN_STATES, *_per_layer(NEW_KV if attention == "standard" else PRESENT_KV, num_layers)]


def _per_layer(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


# ---------------------------------------------------------------- the layout as graph values
class GraphLayout:
    """A `Layout` whose scalars are 0-d int64 tensors (graph inputs). It offers the members the
    reference forward uses (`num_new`, `position_ids`) plus the mask, from the shared rule."""

    def __init__(self, num_new, scalars: dict[str, torch.Tensor]):
        self.num_new = num_new  # the (symbolic) new-token count of input_ids
        self.scalars = scalars

    def position_ids(self, past_lens: torch.Tensor) -> torch.Tensor:
        q_idx = torch.arange(self.num_new, device=past_lens.device)
        return past_lens[:, None] + position_offset(q_idx, **self.scalars)[None, :]

    def dense_mask(self, past_lens: torch.Tensor, kv_len) -> torch.Tensor:
        """Boolean mask [B, 1, new, kv_len] over KV slots (True = attend)."""
        q = torch.arange(self.num_new, device=past_lens.device)[None, :, None]
        s = torch.arange(kv_len, device=past_lens.device)[None, None, :]
        return visible(q, s, past_lens[:, None, None], **self.scalars)[:, None]


class PresentCache:
    """Stands in for `KVCache` during export: `write` puts the new K/V of each layer into
    `past` + new free slots at the rows' slots and keeps the result as that layer's present."""

    def __init__(self, past: list[torch.Tensor]):
        self.past = past  # past_key_0, past_value_0, past_key_1, ...
        self.present: list[torch.Tensor] = []

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len):
        index = slots[:, None, :, None].expand_as(k)  # [B, kv_heads, new, D]
        written = []
        for past, new in ((self.past[2 * layer], k), (self.past[2 * layer + 1], v)):
            present = torch.cat([past, torch.zeros_like(new)], dim=2)
            written.append(present.scatter(2, index, new))
        self.present.extend(written)
        return written[0], written[1]


class NewSlotsCache:
    """Stands in for `KVCache` in the standard graph: `write` keeps each layer's new K/V as its
    outputs and hands attention the cached slots and the new tokens apart, (past, new), so the
    cache input is read in place and never copied."""

    def __init__(self, past: list[torch.Tensor]):
        self.past = past  # past_key_0, past_value_0, past_key_1, ...
        self.new: list[torch.Tensor] = []

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len):
        self.new.extend((k, v))
        return (self.past[2 * layer], k), (self.past[2 * layer + 1], v)


def split_attention(q, keys, values, mask, scale):
    """Eager attention over the cached slots and the new tokens held apart: `keys` / `values` are
    (past [B, kv_heads, P, D], new [B, kv_heads, Q, D]), `mask` is (past [B, P] over cached slots,
    new [Q, Q] among the new tokens). One softmax (fp32) over both parts, so it equals
    `eager_attention` over the cache with the new tokens written at their slots. The query heads
    of one K/V head are stacked into one matrix, so K/V are never expanded."""
    (past_k, new_k), (past_v, new_v) = keys, values
    past_mask, new_mask = mask
    batch, heads, num_new, dim = q.shape
    kv_heads = past_k.shape[1]
    group = heads // kv_heads
    grouped = q.reshape(batch, kv_heads, group * num_new, dim)  # head h reads K/V head h // group
    past_scores = torch.matmul(grouped, past_k.transpose(2, 3)) * scale  # [B, kv_heads, group * Q, P]
    new_scores = torch.matmul(grouped, new_k.transpose(2, 3)) * scale  # [B, kv_heads, group * Q, Q]
    past_scores = past_scores.reshape(batch, kv_heads, group, num_new, -1)
    new_scores = new_scores.reshape(batch, kv_heads, group, num_new, num_new)
    past_scores = past_scores.masked_fill(~past_mask[:, None, None, None, :], float("-inf"))
    new_scores = new_scores.masked_fill(~new_mask, float("-inf"))
    probs = torch.softmax(torch.cat([past_scores, new_scores], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    past_probs, new_probs = probs[..., :past_k.shape[2]], probs[..., past_k.shape[2]:]
    out = (torch.matmul(past_probs.reshape(batch, kv_heads, group * num_new, -1), past_v)
           + torch.matmul(new_probs.reshape(batch, kv_heads, group * num_new, num_new), new_v))
    return out.reshape(batch, heads, num_new, dim)


# ---------------------------------------------------------------- the plugin op
@torch.library.custom_op(f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", mutates_args=())
def hybrid_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_lens: torch.Tensor,
                     causal_len: torch.Tensor, num_blocks: torch.Tensor, block_len: torch.Tensor,
                     first_visible: torch.Tensor, visible_stride: torch.Tensor,
                     num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """Attention of `query` over `key`/`value` under the hybrid mask: the plugin's contract, with
    the standard lowering as its reference body."""
    scalars = dict(causal_len=causal_len, num_blocks=num_blocks, block_len=block_len,
                   first_visible=first_visible, visible_stride=visible_stride)
    mask = GraphLayout(query.shape[2], scalars).dense_mask(past_lens, key.shape[2])
    return eager_attention(query, key, value, mask, scale)


@hybrid_attention.register_fake
def _(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride,
      num_heads, num_kv_heads, head_dim, scale):
    return torch.empty_like(query)


def plugin_schema():
    """The ONNX schema of the plugin node (registered once with onnx, so that onnxscript can emit
    the node and onnx.checker validates it): the contract of the TensorRT plugin."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(PLUGIN_OP, PLUGIN_DOMAIN):
        return onnx.defs.get_schema(PLUGIN_OP, 1, PLUGIN_DOMAIN)
    tensor = OpSchema.FormalParameter
    inputs = [tensor("query", "T", "[batch, num_heads, new, head_dim], RoPE applied"),
              tensor("key", "T", "[batch, num_kv_heads, kv_len, head_dim], new tokens written"),
              tensor("value", "T", "[batch, num_kv_heads, kv_len, head_dim], new tokens written"),
              tensor("past_lens", "I", "[batch] cached length of each row (new tokens follow it)"),
              *(tensor(name, "I", "layout scalar (Layout.kernel_scalars)") for name in LAYOUT_SCALARS)]
    attribute = OpSchema.Attribute
    schema = OpSchema(
        PLUGIN_OP, PLUGIN_DOMAIN, 1,
        doc="Attention under TiDAR's hybrid mask (runtime/layout.py); output [batch, num_heads, new, head_dim].",
        inputs=inputs, outputs=[tensor("output", "T", "[batch, num_heads, new, head_dim]")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("I", ["tensor(int64)"], "lengths and layout scalars")],
        attributes=[attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    attribute("num_kv_heads", OpSchema.AttrType.INT, "key/value heads (GQA)"),
                    attribute("head_dim", OpSchema.AttrType.INT, "width of one head"),
                    attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale")])
    onnx.defs.register_schema(schema)
    return schema


def _plugin_translation(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible,
                        visible_stride, num_heads, num_kv_heads, head_dim, scale):
    """onnxscript translation of the custom op: one node of the plugin's domain."""
    from onnxscript.values import Op, Opset

    plugin = Op(Opset(PLUGIN_DOMAIN, 1), PLUGIN_OP, plugin_schema())
    return plugin(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride,
                  num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale)


# ---------------------------------------------------------------- the exported module
class DecodeStep(nn.Module):
    """One forward of a TiDAR model with graph inputs only (see the module docstring).

    It borrows the reference `TiDARModel.hidden_states` unchanged and replaces only the two
    steps that need concrete sizes: `plan` (the mask and the write slots) and `_attend`. It ends
    at the final norm: the LM head is `LMHead`, a graph of its own."""

    hidden_states = TiDARModel.hidden_states

    def __init__(self, model: TiDARModel, attention: str = "standard"):
        super().__init__()
        if attention not in ATTENTION_LOWERINGS:
            raise ValueError(f"unknown attention lowering {attention!r}; "
                             f"choose one of {', '.join(ATTENTION_LOWERINGS)}")
        self.config, self.attention = model.config, attention
        self.model, self.inv_freq = model.model, model.inv_freq
        self.dtype = model.dtype

    def rope_frequencies(self, device: torch.device) -> torch.Tensor:
        """The RoPE inverse frequencies on `device` (a constant of the traced graph)."""
        return self.inv_freq.to(device)

    def plan(self, layout: GraphLayout, past_lens: torch.Tensor, cache,
             kv_len: int | None = None) -> AttentionPlan:
        """The traced graph attends over its past inputs plus the new tokens (`kv_len`, the
        eager model's CUDA-graph width, does not apply to a graph). Standard: every new token
        sees a row's cached slots below past_lens[r] (`visible`'s first clause) and the new
        tokens by the layout's rule, the same for every row; plugin: the plugin's inputs."""
        past = cache.past[0].shape[2]
        write_slots = past_lens[:, None] + torch.arange(layout.num_new, device=past_lens.device)
        if self.attention == "plugin":
            mask = (past_lens, *layout.scalars.values())  # the plugin builds the mask itself
        else:
            cached = torch.arange(past, device=past_lens.device)[None, :] < past_lens[:, None]  # [B, P]
            mask = (cached, layout.dense_mask(torch.zeros_like(past_lens[:1]), layout.num_new)[0, 0])  # [Q, Q]
        return AttentionPlan(layout, past_lens, past + layout.num_new, mask, write_slots)

    def _attend(self):
        if self.attention == "standard":
            return split_attention
        c = self.config

        def plugin(q, k, v, mask, scale):
            return hybrid_attention(q, k, v, *mask, num_heads=c.num_attention_heads,
                                    num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, scale=scale)

        return plugin

    def forward(self, input_ids, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride,
                *past_key_values):
        scalars = dict(causal_len=causal_len, num_blocks=num_blocks, block_len=block_len,
                       first_visible=first_visible, visible_stride=visible_stride)
        layout = GraphLayout(input_ids.shape[1], scalars)
        if self.attention == "standard":
            cache = NewSlotsCache(list(past_key_values))
            hidden = self.hidden_states(input_ids, layout, cache, past_lens)
            return (hidden, *cache.new)
        cache = PresentCache(list(past_key_values))
        return (self.hidden_states(input_ids, layout, cache, past_lens), *cache.present)


class LMHead(nn.Module):
    """The LM head as a graph of its own: hidden states [batch, rows, hidden] -> float32 logits
    [batch, rows, vocab], for the rows the runtime picks from the decode step's output."""

    def __init__(self, model: TiDARModel):
        super().__init__()
        self.lm_head = model.lm_head

    def forward(self, hidden_states):
        return self.lm_head(hidden_states).float()


def example_inputs(config, batch: int = 2, past: int = 3, draft_len: int = 2,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Inputs of a decode step of `draft_len`, used to trace the graph (sizes >= 2 so that no
    dynamic dimension is specialized)."""
    layout = Layout.decode(draft_len)
    input_ids = torch.zeros(batch, layout.num_new, dtype=torch.long)
    past_lens = torch.full((batch,), past, dtype=torch.long)
    scalars = [torch.tensor(value, dtype=torch.long) for value in layout.kernel_scalars().values()]
    cache_shape = (batch, config.num_key_value_heads, past, config.head_dim)
    caches = [torch.zeros(cache_shape, dtype=dtype) for _ in range(2 * config.num_hidden_layers)]
    return (input_ids, past_lens, *scalars, *caches)


# ---------------------------------------------------------------- tracing without weights
WeightChunks = Callable[[str], Iterable[torch.Tensor]]
"""The weights to write: HF tensor name -> its values as consecutive row chunks (any float dtype)."""


def placeholder_model(config: TiDARConfig, dtype: torch.dtype = torch.float32) -> TiDARModel:
    """A `TiDARModel` of `config` whose parameters cost no memory: each is a zero scalar expanded
    to the parameter's shape (tied parameters stay one object). Tracing needs only shapes and
    dtypes; the values are written to the graph's external data separately."""
    with torch.device("meta"):
        model = TiDARModel(config)
    placeholders: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in placeholders:
                    values = torch.zeros((), dtype=dtype).expand(param.shape)
                    placeholders[id(param)] = nn.Parameter(values, requires_grad=False)
                module._parameters[name] = placeholders[id(param)]
    return model.eval()


def weight_names(step: nn.Module, hf_names: Iterable[str]) -> dict[str, str]:
    """{parameter name of `step` (as the graph's initializers are named): the HF tensor it holds}
    for every alias of every parameter (a tied LM head holds the embedding)."""
    hf_names = set(hf_names)
    aliases: dict[int, list[str]] = {}
    for name, param in step.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    mapping = {}
    for names in aliases.values():
        stored = [name for name in names if name in hf_names]
        if len(stored) != 1:
            raise ValueError(f"parameter {names[0]!r} is not exactly one tensor of the checkpoint: {stored}")
        mapping.update({name: stored[0] for name in names})
    return mapping


def _keep_weights_out_of_folding(weights: set[str]) -> Callable:
    """onnxscript's `should_fold`: never fold a node that reads a weight (the weights have no
    values while the graph is optimised; everything else folds by the default rules)."""
    def should_fold(node) -> bool | None:
        return False if any(value is not None and value.name in weights for value in node.inputs) else None
    return should_fold


def trace_decode_step(config: TiDARConfig, attention: str = "standard", opset: int | None = None,
                      dtype: torch.dtype = torch.float32):
    """(onnx_ir Model, {weight initializer: (HF name, shape)}) of one forward of a `config` model
    (`opset` None: the lowering's, `LOWERING_OPSETS`).

    The graph is traced from `placeholder_model`; its weight initializers are left without
    values (the caller attaches them as external data) and the graph is optimised (constant
    folding, common subexpressions) around them with onnxscript's optimizer, so no weight is
    ever folded into a derived constant: the weights in the file are the checkpoint's own."""
    step = DecodeStep(placeholder_model(config, dtype), attention).eval()
    opset = LOWERING_OPSETS[attention] if opset is None else opset
    layers = config.num_hidden_layers
    batch, new, past = torch.export.Dim("batch"), torch.export.Dim("new"), torch.export.Dim("past")
    cache_shape = {0: batch, 2: past}
    dynamic_shapes = ({0: batch, 1: new}, {0: batch}, *([None] * len(LAYOUT_SCALARS)),
                      tuple([cache_shape] * (2 * layers)))  # *past_key_values: one tuple
    translations = {torch.ops.tidar.hybrid_attention.default: _plugin_translation} if attention == "plugin" else None
    return _trace(step, example_inputs(config, dtype=dtype), input_names(layers), output_names(layers, attention),
                  dynamic_shapes, weight_names(step, _hf_names(config)), opset, translations)


def trace_lm_head(config: TiDARConfig, opset: int = DEFAULT_OPSET, dtype: torch.dtype = torch.float32):
    """(onnx_ir Model, {weight initializer: (HF name, shape)}) of the LM-head graph of a `config`
    model (see the module docstring), traced and optimised as `trace_decode_step`."""
    from .source import head_weight_source

    head = LMHead(placeholder_model(config, dtype)).eval()
    rows = (torch.export.Dim("batch"), torch.export.Dim("rows"))
    example = torch.zeros(2, 3, config.hidden_size, dtype=dtype)
    return _trace(head, (example,), [HIDDEN_STATES], [LOGITS], ({0: rows[0], 1: rows[1]},),
                  {"lm_head.weight": head_weight_source(config)}, opset, None)


def _trace(module: nn.Module, inputs: tuple, inputs_named: list[str], outputs_named: list[str], dynamic_shapes,
           names: dict[str, str], opset: int, translations):
    """Trace `module` without weights (see `trace_decode_step`); `names`: {parameter name: HF name}."""
    import onnxscript.optimizer

    with torch.no_grad():
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=opset, input_names=inputs_named,
            output_names=outputs_named, dynamic_shapes=dynamic_shapes, custom_translation_table=translations,
            external_data=False, optimize=False, verbose=False)
    model = program.model
    weights = {}
    for name, value in model.graph.initializers.items():
        if name in names:
            weights[name] = (names[name], tuple(value.const_value.shape))
            value.const_value = None
    dedup_logger = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup_logger.level
    dedup_logger.setLevel(logging.ERROR)  # it warns about every initializer without a value
    try:
        onnxscript.optimizer.optimize_ir(model, should_fold=_keep_weights_out_of_folding(set(weights)))
    finally:
        dedup_logger.setLevel(level)
    if opset >= 23:  # RMSNormalization and RotaryEmbedding nodes for the matched subgraphs
        from onnxscript.rewriter import onnx_fusions

        onnx_fusions.fuse(model)
    return model, {name: weights[name] for name in model.graph.initializers if name in weights}


def _hf_names(config: TiDARConfig) -> list[str]:
    from .source import model_shapes

    return list(model_shapes(config))


# ---------------------------------------------------------------- external weights
WEIGHT_ALIGNMENT = 4096
"""Byte alignment of every tensor in the weights file (page-aligned, so readers may map it)."""
_IR_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16"}


def write_weights(path: Path, tensors: dict[str, tuple[int, ...]], chunks: WeightChunks,
                  dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Write each HF tensor of `tensors` ({name: shape}), in order and converted to `dtype`, into
    the raw external-data file `path`, one row chunk at a time; returns {name: (offset, length)}."""
    from .safetensors_stream import TensorSpec, write_tensor_bytes

    extents = {}
    with open(path, "wb") as handle:
        for name, shape in tensors.items():
            offset = handle.tell()
            if offset % WEIGHT_ALIGNMENT:
                offset += WEIGHT_ALIGNMENT - offset % WEIGHT_ALIGNMENT
                handle.seek(offset)
            written = sum(write_tensor_bytes(handle, chunk.to(dtype)) for chunk in chunks(name))
            expected = TensorSpec(name, dtype, shape).nbytes
            if written != expected:
                raise ValueError(f"{path}: tensor {name!r} has {written} bytes, its shape {shape} needs {expected}")
            extents[name] = (offset, written)
        handle.truncate()
    return extents


def _attach_and_save(model, weights: dict[str, tuple[str, tuple[int, ...]]], extents: dict[str, tuple[int, int]],
                     weights_path: Path, dtype: torch.dtype, path: Path) -> None:
    """Point the weight initializers of the traced `model` at their extents of `weights_path`
    and save the graph to `path`."""
    import onnx_ir as ir

    for name, (hf, shape) in weights.items():
        if hf not in extents:
            raise ValueError(f"{path}: weight {hf!r} is not in the shared weights file {weights_path}")
        offset, length = extents[hf]
        model.graph.initializers[name].const_value = ir.ExternalTensor(
            weights_path.name, offset, length, getattr(ir.DataType, _IR_DTYPES[dtype]),
            shape=ir.Shape(shape), name=name, base_dir=str(weights_path.parent))
    unset = [name for name, value in model.graph.initializers.items() if value.const_value is None]
    if unset:
        raise ValueError(f"{path}: initializer {unset[0]!r} has no value (not a checkpoint weight)")
    ir.save(model, str(path))


def export_decode_steps(config: TiDARConfig, chunks: WeightChunks, graphs: dict[str, str | Path],
                        weights_path: str | Path, head_path: str | Path, opset: int | None = None,
                        dtype: torch.dtype = torch.float32,
                        progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write one graph per lowering of `graphs` ({attention: path}), the LM-head graph to
    `head_path`, and the weights they all share, once, to `weights_path` (ONNX external data in
    the same folder as every graph); `chunks` supplies the weights (`WeightChunks`) converted
    here to `dtype`. Memory holds one traced step graph (and the small head graph) and one chunk
    of weights at a time. Returns {attention: path, "lm_head": head_path}."""
    weights_path = Path(weights_path)
    paths = {attention: Path(path) for attention, path in graphs.items()}
    for attention, path in paths.items():
        if attention not in ATTENTION_LOWERINGS:
            raise ValueError(f"unknown attention lowering {attention!r}; "
                             f"choose one of {', '.join(ATTENTION_LOWERINGS)}")
    head_path = Path(head_path)
    for path in (*paths.values(), head_path):
        if path.parent.resolve() != weights_path.parent.resolve():
            raise ValueError(f"{path}: a graph must sit in the folder of its weights file {weights_path}")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    head, head_weights = trace_lm_head(config, DEFAULT_OPSET if opset is None else opset, dtype)
    extents: dict[str, tuple[int, int]] | None = None

    def write(step_weights: dict) -> dict[str, tuple[int, int]]:
        """The file's contents: every weight of the first step graph, then the head's if it is not
        one of them (an untied lm_head.weight)."""
        tensors = dict(step_weights.values())
        tensors.update(head_weights.values())
        written = write_weights(weights_path, tensors, chunks, dtype)
        if progress:
            progress(f"wrote {weights_path}")
        return written

    for attention, path in paths.items():
        model, weights = trace_decode_step(config, attention, opset, dtype)
        if extents is None:
            extents = write(weights)
        _attach_and_save(model, weights, extents, weights_path, dtype, path)
        del model  # before the next lowering is traced
        if progress:
            progress(f"wrote {path}")
    if extents is None:
        extents = write({})
    _attach_and_save(head, head_weights, extents, weights_path, dtype, head_path)
    if progress:
        progress(f"wrote {head_path}")
    return {**paths, "lm_head": head_path}


def onnxruntime_backend(model: TiDARModel, folder: str | Path, threads: int = 0):
    """An ONNX Runtime backend of `model`: its standard step graph and LM head exported into
    `folder` (decode_step.onnx, lm_head.onnx), opened with `threads` intra-op threads."""
    from ..runtime.backends.onnx_backend import OnnxRuntimeBackend

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graph = export_decode_step(model, folder / "decode_step.onnx", head_path=folder / "lm_head.onnx")
    return OnnxRuntimeBackend(graph, folder / "lm_head.onnx", model.config, threads=threads)


def default_head_path(path: str | Path) -> Path:
    """Where `export_decode_step` writes the LM-head graph of the step graph `path` by default:
    beside it, named STEM.lm_head.onnx."""
    path = Path(path)
    return path.with_name(f"{path.stem}.lm_head.onnx")


def export_decode_step(model: TiDARModel, path: str | Path, attention: str = "standard",
                       opset: int | None = None, weights_path: str | Path | None = None,
                       head_path: str | Path | None = None) -> Path:
    """Write the ONNX graph of one forward of the in-memory `model` to `path` (see the module
    docstring), its LM-head graph to `head_path` (default: `default_head_path(path)`) and their
    weights to `weights_path` (default: `path` with the suffix `.weights`); `attention` is
    "standard" (runs in ONNX Runtime) or "plugin" (tidar::hybrid_attention nodes). Returns `path`."""
    path = Path(path)
    state = model.state_dict()
    weights_path = Path(weights_path) if weights_path is not None else path.with_suffix(".weights")
    head_path = Path(head_path) if head_path is not None else default_head_path(path)
    graphs = export_decode_steps(model.config, lambda name: (state[name],), {attention: path}, weights_path,
                                 head_path, opset, model.dtype)
    return graphs[attention]

"""TensorRT-LLM 1.2.x model definition of TiDAR (`TiDARForCausalLM`), for the engine flow.

Used by `trtllm-build --model_cls_file <this file> --model_cls_name TiDARForCausalLM` (see
OUT/trtllm/build_engine.sh) and by `tidar-export build --engine auto|require` through TensorRT-LLM's
Python API (`tensorrt_llm.builder.build`). TensorRT-LLM 1.2.x is the last release with the
TensorRT-engine flow; later releases keep only the PyTorch backend.

The network is one decode step of `export/onnx_export.py`, built from TensorRT-LLM layers, with
an explicit KV cache (no paged cache, no gpt_attention plugin) and attention through the
hybrid-mask plugin `tidar.plugins.trtllm_plugin.hybrid_attention_trtllm`:

    inputs   input_ids [batch, new] int32, position_ids [batch, new] int32,
             past_lens [batch] int32, the five layout scalars (`Layout.kernel_scalars()`) int32 [],
             past_key_{i}, past_value_{i} [batch, kv_heads_local, past, head_dim] (model dtype)
    outputs  hidden_states [batch, new, hidden] (model dtype): the final-norm hidden states of
             every new token, AR and diffusion rows alike,
             present_key_{i}, present_value_{i} [batch, kv_heads_local, past + new, head_dim]

The LM head is not part of the network. The decode loop needs logits of 2b - 1 rows per step,
and which b - 1 of them depends on the step's verification, so the runtime applies the head to
the rows it picks from `hidden_states` (runtime/backends/engine_backend.py; docs/design.md §3.8). The model
still declares and loads `lm_head` (the checkpoint keeps TensorRT-LLM's causal-LM layout, and the
runtime reads lm_head.weight from rank0.safetensors), but `forward` never uses it, so the engine
holds no copy.

New tokens' K/V are written at slots past_lens[r] .. past_lens[r] + new - 1 of `present` (the
slot convention of runtime/cache.py); slots after them hold stale values the mask never reads.
Position ids are an input (the runtime's `Layout.position_ids`), so RoPE needs no layout logic.

Weights are named exactly as the rank files of `export/trtllm_checkpoint.py` (`transformer.layers.N.
attention.qkv.weight` ...); tensor parallelism follows `config.mapping` (column-parallel qkv/fc/gate
and LM head, row-parallel dense/proj with all-reduce; KV heads duplicated when fewer than ranks).

Everything that does not need TensorRT-LLM — rank-local sizes, the weight names and shapes the
model declares, the input specification with its dimension ranges — is plain Python below and
tested on CPU (tests/test_trtllm_model.py). The model classes are defined only when tensorrt_llm
is importable; `TRTLLM_IMPORT_ERROR` says why not otherwise. trtllm-build loads this file on its
own (not as part of the tidar package), so imports here are absolute and tidar must be installed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tidar.export.engine_shapes import LAYOUT_SCALARS, DimRange, max_past_for_seq_len, ranges_for_limits

ARCHITECTURE = "TiDARForCausalLM"
INDEX_DTYPE = "int32"


# ---------------------------------------------------------------- sizes (plain Python)
@dataclass(frozen=True)
class RankSizes:
    """What one tensor-parallel rank of a TiDAR checkpoint holds (the same on every rank)."""

    tp_size: int
    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int  # query heads of this rank
    num_kv_heads: int  # key/value heads of this rank (duplicated across ranks when fewer than tp)
    intermediate_size: int  # MLP width of this rank
    vocab_size: int  # unpadded vocabulary (embedding rows, logits)
    vocab_size_padded: int  # LM head rows over all ranks (a multiple of tp)
    qkv_bias: bool
    qk_layernorm: bool

    @property
    def qkv_rows(self) -> int:
        """Rows of this rank's fused qkv weight: its Q heads, then K heads, then V heads."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


def rank_sizes(config: dict) -> RankSizes:
    """RankSizes of a TRT-LLM checkpoint config.json (as `trtllm_checkpoint.trtllm_config` writes
    it); raises ValueError naming the field that cannot be split."""
    tp = config["mapping"]["tp_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name in ("num_attention_heads", "intermediate_size", "vocab_size_padded"):
        if config[name] % tp:
            raise ValueError(f"config.json field {name!r} ({config[name]}) is not divisible by tp_size {tp}")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"config.json field 'num_key_value_heads' ({kv_heads}) neither divides nor is "
                         f"divisible by tp_size {tp}")
    return RankSizes(tp_size=tp, num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                     head_dim=config["head_size"], num_heads=heads // tp, num_kv_heads=max(kv_heads // tp, 1),
                     intermediate_size=config["intermediate_size"] // tp, vocab_size=config["vocab_size"],
                     vocab_size_padded=config["vocab_size_padded"], qkv_bias=bool(config["qkv_bias"]),
                     qk_layernorm=bool(config["qk_layernorm"]))


def declared_weights(config: dict) -> dict[str, tuple[int, ...]]:
    """{name: rank-local shape} of every weight `TiDARForCausalLM` declares, i.e. what each rank
    file must hold. The model checks its own parameters against this when it is built."""
    s = rank_sizes(config)
    weights = {"transformer.vocab_embedding.weight": (s.vocab_size, s.hidden_size),
               "transformer.ln_f.weight": (s.hidden_size,),
               "lm_head.weight": (s.vocab_size_padded // s.tp_size, s.hidden_size)}
    for i in range(s.num_layers):
        layer = f"transformer.layers.{i}."
        weights[layer + "input_layernorm.weight"] = (s.hidden_size,)
        weights[layer + "post_layernorm.weight"] = (s.hidden_size,)
        weights[layer + "attention.qkv.weight"] = (s.qkv_rows, s.hidden_size)
        if s.qkv_bias:
            weights[layer + "attention.qkv.bias"] = (s.qkv_rows,)
        if s.qk_layernorm:
            weights[layer + "attention.q_layernorm.weight"] = (s.head_dim,)
            weights[layer + "attention.k_layernorm.weight"] = (s.head_dim,)
        weights[layer + "attention.dense.weight"] = (s.hidden_size, s.num_heads * s.head_dim)
        weights[layer + "mlp.fc.weight"] = (s.intermediate_size, s.hidden_size)
        weights[layer + "mlp.gate.weight"] = (s.intermediate_size, s.hidden_size)
        weights[layer + "mlp.proj.weight"] = (s.hidden_size, s.intermediate_size)
    return weights


# ---------------------------------------------------------------- inputs (plain Python)
@dataclass(frozen=True)
class InputSpec:
    """One network input: its dims are ints (static) or names of `DimRange`s (dynamic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def shape(self) -> list[int]:
        """The TensorRT shape: -1 for each dynamic dim."""
        return [-1 if isinstance(d, str) else d for d in self.dims]

    def dim_range(self, ranges: dict[str, DimRange]) -> OrderedDict | None:
        """TensorRT-LLM's `dim_range` (one optimization profile); None for a 0-d input."""
        if not self.dims:
            return None
        named = [(d, [list(ranges[d].as_tuple())]) if isinstance(d, str) else (f"{self.name}_{axis}", [d])
                 for axis, d in enumerate(self.dims)]
        return OrderedDict(named)


def input_specs(config: dict) -> list[InputSpec]:
    """The network inputs in order (see the module docstring)."""
    s = rank_sizes(config)
    specs = [InputSpec("input_ids", INDEX_DTYPE, ("batch", "new")),
             InputSpec("position_ids", INDEX_DTYPE, ("batch", "new")),
             InputSpec("past_lens", INDEX_DTYPE, ("batch",)),
             *(InputSpec(name, INDEX_DTYPE, ()) for name in LAYOUT_SCALARS)]
    for i in range(s.num_layers):
        for kind in ("key", "value"):
            specs.append(InputSpec(f"past_{kind}_{i}", config["dtype"], ("batch", s.num_kv_heads, "past", s.head_dim)))
    return specs


def output_names(config: dict) -> list[str]:
    return ["hidden_states",
            *(f"present_{kind}_{i}" for i in range(config["num_hidden_layers"]) for kind in ("key", "value"))]


def output_specs(config: dict) -> list[InputSpec]:
    """The network outputs in order, with the dtypes the model marks them with (`forward`):
    final-norm hidden states and K/V presents in the model dtype. "kv" is the past length plus
    the new tokens."""
    s = rank_sizes(config)
    specs = [InputSpec("hidden_states", config["dtype"], ("batch", "new", s.hidden_size))]
    specs += [InputSpec(name, config["dtype"], ("batch", s.num_kv_heads, "kv", s.head_dim))
              for name in output_names(config)[1:]]
    return specs


def builder_ranges(config: dict, max_batch_size: int, max_input_len: int, max_seq_len: int,
                   max_draft_len: int = 0) -> dict[str, DimRange]:
    """Dimension ranges from the sizes `tensorrt_llm.builder.build` passes to `prepare_inputs`.
    The decode step is the config's tidar.draft_len b with tidar.draft_blocks k mask blocks
    (None: k = b), which `tidar-export build` writes into trtllm/config.json and sets on the
    model; a config without them takes `max_draft_len` (trtllm-build --max_draft_len; its default
    0 cannot be told from "AR", so 0 there falls back to the block size). The config wins because
    `builder.build` hands max_draft_len on unchanged without a speculative-decoding mode and a
    draft length of 0 (an AR export) reads as "not given". `max_seq_len` covers the cached tokens
    plus one decode step (`engine_shapes.engine_limits`), so the past ranges up to
    `max_past_for_seq_len`."""
    tidar = config["tidar"]
    draft_len = tidar.get("draft_len")
    if draft_len is None:
        draft_len = max_draft_len or tidar["block_size"]
    blocks = tidar.get("draft_blocks")
    return ranges_for_limits(max_batch_size, max_input_len, max_past_for_seq_len(max_seq_len, draft_len, blocks),
                             draft_len, blocks)


def allow_plugin_v3_layers(layer_class, trt) -> None:
    """Teach TensorRT-LLM's graph rewriting the layer type of Python (IPluginV3) plugins.

    `tensorrt_llm.builder.build` runs `graph_rewriting.optimize`, which calls `Layer.as_layer()`
    on every layer; that looks the type up in `Layer.TRT_LAYER_TYPE_TO_LAYER` and raises
    NotImplementedError("Unknown layer type") for a type it lacks. TensorRT-LLM 1.2's table has
    PLUGIN_V2 but not PLUGIN_V3, the type of the hybrid-attention plugin layer (`PluginBase` adds
    it with `add_plugin_v3`). The rewriting only reads the layer's type, so its class entry is
    TensorRT's IPluginV3Layer (ILayer where that binding is absent). Idempotent."""
    table = layer_class.TRT_LAYER_TYPE_TO_LAYER
    table.setdefault(trt.LayerType.PLUGIN_V3, getattr(trt, "IPluginV3Layer", trt.ILayer))


# ---------------------------------------------------------------- the TensorRT-LLM model
try:
    import tensorrt_llm  # noqa: F401
except (ImportError, OSError, RuntimeError) as _error:  # absent, or installed without its CUDA libraries
    TRTLLM_IMPORT_ERROR: str | None = f"tensorrt_llm is not importable: {_error}"
else:
    TRTLLM_IMPORT_ERROR = None

if TRTLLM_IMPORT_ERROR is not None:
    TiDARForCausalLM = None  # the model class needs tensorrt_llm (see TRTLLM_IMPORT_ERROR)
else:
    import numpy as np
    import tensorrt as trt
    from tensorrt_llm import functional as F
    from tensorrt_llm._utils import str_dtype_to_trt
    from tensorrt_llm.functional import Tensor
    from tensorrt_llm.graph_rewriting import Layer
    from tensorrt_llm.layers import ColumnLinear, Embedding, GatedMLP, RmsNorm, RowLinear
    from tensorrt_llm.models import MODEL_MAP
    from tensorrt_llm.models.modeling_utils import PretrainedConfig, PretrainedModel
    from tensorrt_llm.module import Module, ModuleList

    class TiDARTRTLLMConfig(PretrainedConfig):
        """PretrainedConfig with the fields trtllm_checkpoint writes beyond the common ones."""

        def __init__(self, *, qkv_bias: bool = False, tie_word_embeddings: bool = False,
                     rotary_base: float = 10000.0, rotary_scaling: dict | None = None,
                     vocab_size_padded: int | None = None, tidar: dict | None = None, **kwargs):
            super().__init__(**kwargs)
            self.qkv_bias, self.tie_word_embeddings = qkv_bias, tie_word_embeddings
            self.rotary_base, self.rotary_scaling = rotary_base, rotary_scaling
            self.vocab_size_padded, self.tidar = vocab_size_padded, tidar or {}

        def checkpoint_dict(self) -> dict:
            """The fields `rank_sizes` and friends read, as config.json spells them."""
            return {"mapping": {"tp_size": self.mapping.tp_size}, "num_attention_heads": self.num_attention_heads,
                    "num_key_value_heads": self.num_key_value_heads, "intermediate_size": self.intermediate_size,
                    "vocab_size": self.vocab_size, "vocab_size_padded": self.vocab_size_padded,
                    "num_hidden_layers": self.num_hidden_layers, "hidden_size": self.hidden_size,
                    "head_size": self.head_size, "qkv_bias": self.qkv_bias, "qk_layernorm": self.qk_layernorm,
                    "dtype": self.dtype, "tidar": self.tidar}

    def _rotate_half(x: Tensor, head_dim: int) -> Tensor:
        first, second = F.split(x, head_dim // 2, dim=3)
        return F.concat([second * -1.0, first], dim=3)

    class TiDARAttention(Module):
        """Fused qkv projection, optional q/k RMSNorm, RoPE, KV write and the hybrid-mask plugin."""

        def __init__(self, config: TiDARTRTLLMConfig, sizes: RankSizes):
            super().__init__()
            self.sizes, mapping = sizes, config.mapping
            s = sizes
            self.qkv = ColumnLinear(s.hidden_size, s.tp_size * s.qkv_rows, bias=s.qkv_bias, dtype=config.dtype,
                                    tp_group=mapping.tp_group, tp_size=s.tp_size, gather_output=False)
            if s.qk_layernorm:
                self.q_layernorm = RmsNorm(s.head_dim, eps=config.norm_epsilon, dtype=config.dtype)
                self.k_layernorm = RmsNorm(s.head_dim, eps=config.norm_epsilon, dtype=config.dtype)
            self.dense = RowLinear(s.tp_size * s.num_heads * s.head_dim, s.hidden_size, bias=False,
                                   dtype=config.dtype, tp_group=mapping.tp_group, tp_size=s.tp_size)

        def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, past_key: Tensor,
                    past_value: Tensor, past_lens: Tensor, scalars: list[Tensor]):
            from tidar.plugins.trtllm_plugin import hybrid_attention_trtllm  # written alongside; loaded lazily

            s = self.sizes
            batch, new = F.shape(x, 0), F.shape(x, 1)
            q, k, v = F.split(self.qkv(x), [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                                            s.num_kv_heads * s.head_dim], dim=2)
            q = q.view(F.concat([batch, new, s.num_heads, s.head_dim]))
            k = k.view(F.concat([batch, new, s.num_kv_heads, s.head_dim]))
            v = v.view(F.concat([batch, new, s.num_kv_heads, s.head_dim]))
            if s.qk_layernorm:
                q, k = self.q_layernorm(q), self.k_layernorm(k)
            q, k, v = (t.permute([0, 2, 1, 3]) for t in (q, k, v))  # [batch, heads, new, head_dim]
            q = q * cos + _rotate_half(q, s.head_dim) * sin
            k = k * cos + _rotate_half(k, s.head_dim) * sin
            index = F.expand(slots, F.concat([batch, s.num_kv_heads, new, s.head_dim]))
            present_key = F.scatter(F.concat([past_key, k], dim=2), 2, index, k)
            present_value = F.scatter(F.concat([past_value, v], dim=2), 2, index, v)
            out = hybrid_attention_trtllm(q, present_key, present_value, past_lens, *scalars,
                                          num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                                          head_dim=s.head_dim, scale=s.head_dim ** -0.5)
            out = out.permute([0, 2, 1, 3]).view(F.concat([batch, new, s.num_heads * s.head_dim]))
            return self.dense(out), present_key, present_value

    class TiDARDecoderLayer(Module):
        def __init__(self, config: TiDARTRTLLMConfig, sizes: RankSizes):
            super().__init__()
            s, mapping = sizes, config.mapping
            self.input_layernorm = RmsNorm(s.hidden_size, eps=config.norm_epsilon, dtype=config.dtype)
            self.attention = TiDARAttention(config, sizes)
            self.post_layernorm = RmsNorm(s.hidden_size, eps=config.norm_epsilon, dtype=config.dtype)
            self.mlp = GatedMLP(s.hidden_size, s.tp_size * s.intermediate_size, hidden_act="silu", bias=False,
                                dtype=config.dtype, tp_group=mapping.tp_group, tp_size=s.tp_size)

        def forward(self, x, cos, sin, slots, past_key, past_value, past_lens, scalars):
            attended, present_key, present_value = self.attention(
                self.input_layernorm(x), cos, sin, slots, past_key, past_value, past_lens, scalars)
            x = x + attended
            return x + self.mlp(self.post_layernorm(x)), present_key, present_value

    class TiDARTransformer(Module):
        def __init__(self, config: TiDARTRTLLMConfig, sizes: RankSizes):
            super().__init__()
            self.vocab_embedding = Embedding(sizes.vocab_size, sizes.hidden_size, dtype=config.dtype)
            self.layers = ModuleList([TiDARDecoderLayer(config, sizes) for _ in range(sizes.num_layers)])
            self.ln_f = RmsNorm(sizes.hidden_size, eps=config.norm_epsilon, dtype=config.dtype)

    class TiDARForCausalLM(PretrainedModel):
        """TiDAR's decode step as a TensorRT-LLM model (see the module docstring)."""

        config_class = TiDARTRTLLMConfig

        def __init__(self, config: TiDARTRTLLMConfig):
            super().__init__(config)
            self.sizes = rank_sizes(config.checkpoint_dict())
            s = self.sizes
            self.transformer = TiDARTransformer(config, s)
            self.lm_head = ColumnLinear(s.hidden_size, s.vocab_size_padded, bias=False, dtype=config.dtype,
                                        tp_group=config.mapping.tp_group, tp_size=s.tp_size, gather_output=True)
            declared = {name: tuple(param.shape) for name, param in self.named_parameters()}
            expected = declared_weights(config.checkpoint_dict())
            if declared != expected:
                wrong = sorted(set(declared.items()) ^ set(expected.items()))[0]
                raise ValueError(f"{ARCHITECTURE}: parameter {wrong[0]!r} {wrong[1]} disagrees with the "
                                 "checkpoint layout (trtllm_model.declared_weights)")

        def check_config(self, config):
            config.set_if_not_exist("qkv_bias", False)
            config.set_if_not_exist("rotary_base", 10000.0)
            config.set_if_not_exist("rotary_scaling", None)

        def _rope(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
            """cos, sin [batch, 1, new, head_dim] of the positions (RoPE tables in float32)."""
            import torch

            from tidar.runtime.config import TiDARConfig
            from tidar.runtime.model import rope_inverse_frequencies

            hf_config = TiDARConfig.from_dict(self.config.tidar["hf_config"])
            inv_freq = F.constant(rope_inverse_frequencies(hf_config).to(torch.float32).numpy())
            angles = F.unsqueeze(F.cast(position_ids, "float32"), 2) * F.unsqueeze(F.unsqueeze(inv_freq, 0), 0)
            angles = F.unsqueeze(F.concat([angles, angles], dim=2), 1)
            return F.cast(F.cos(angles), self.config.dtype), F.cast(F.sin(angles), self.config.dtype)

        def forward(self, input_ids, position_ids, past_lens, causal_len, num_blocks, block_len, first_visible,
                    visible_stride, past_key_values):
            scalars = [causal_len, num_blocks, block_len, first_visible, visible_stride]
            cos, sin = self._rope(position_ids)
            new = F.shape(input_ids, 1)
            start = F.constant(np.array(0, dtype=np.int32))  # arange takes two ints or two tensors
            offsets = F.unsqueeze(F.arange(start, F.cast(new, INDEX_DTYPE), INDEX_DTYPE), 0)
            slots = F.unsqueeze(F.unsqueeze(F.unsqueeze(past_lens, 1) + offsets, 1), 3)  # [batch, 1, new, 1]
            x = self.transformer.vocab_embedding(input_ids)
            presents = []
            for i, layer in enumerate(self.transformer.layers):
                x, present_key, present_value = layer(x, cos, sin, slots, past_key_values[2 * i],
                                                      past_key_values[2 * i + 1], past_lens, scalars)
                presents += [present_key, present_value]
            hidden = self.transformer.ln_f(x)  # the runtime applies lm_head to the rows it picks
            names = output_names(self.config.checkpoint_dict())
            hidden.mark_output(names[0], self.config.dtype)
            for name, present in zip(names[1:], presents):
                present.mark_output(name, self.config.dtype)
            return hidden

        def prepare_inputs(self, max_batch_size, max_input_len, max_seq_len, max_draft_len=0, **_unused):
            """The network inputs of `input_specs`, with one optimization profile from the builder's
            sizes (the other arguments tensorrt_llm.builder.build passes do not apply)."""
            config = self.config.checkpoint_dict()
            ranges = builder_ranges(config, max_batch_size, max_input_len, max_seq_len, max_draft_len)
            tensors = {spec.name: Tensor(name=spec.name, dtype=str_dtype_to_trt(spec.dtype), shape=spec.shape(),
                                         dim_range=spec.dim_range(ranges))
                       for spec in input_specs(config)}
            past = [tensors.pop(name) for name in list(tensors) if name.startswith("past_") and name != "past_lens"]
            return {**tensors, "past_key_values": past}

    allow_plugin_v3_layers(Layer, trt)  # before any build (tidar-export build and trtllm-build alike)

    # trtllm-build reads config.json through PretrainedConfig.from_dict, which looks the
    # architecture up in MODEL_MAP (its config_class parses the TiDAR fields).
    MODEL_MAP[ARCHITECTURE] = TiDARForCausalLM

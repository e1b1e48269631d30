"""A torch stand-in for the parts of TensorRT-LLM 1.2 that export/trtllm_model.py builds its network
from, so that the network's computation runs here, eagerly, with the weights of a TensorRT-LLM
checkpoint.

`load_network(folder)` executes export/trtllm_model.py (under a private module name) with
stand-in `tensorrt` and `tensorrt_llm` modules in sys.modules, builds its `TiDARForCausalLM` from
the checkpoint's config.json, loads rank0.safetensors into it (every declared weight, name and
shape exactly) and returns a `Network`: {input name: array} -> {output name: tensor}, the
outputs being what the model marks with `mark_output`, in the dtypes it marks them with.

What is stood in, and the vendor semantics it follows (tensorrt_llm/layers/{linear,mlp,
normalization,embedding}.py and tensorrt_llm/functional.py):
- `Tensor`: a torch.Tensor subclass; `view(shape)` takes a shape tensor (as TensorRT's shuffle
  layer does), `mark_output(name, dtype)` records a network output and refuses a dtype other
  than the tensor's (a strongly typed network cannot re-type an output).
- functional: shape (0-d size), split, concat (ints and 0-d tensors become 1-element tensors),
  unsqueeze, expand, scatter (ScatterMode.ELEMENT: torch.scatter), arange, cast, cos, sin,
  constant.
- layers: ColumnLinear / RowLinear (weight [out, in], x @ W^T + bias; tp_size 1 only, no
  all-reduce), Embedding (row gather), RmsNorm (normalized in float32, cast back to the input's
  dtype, then times the weight), GatedMLP (proj(silu(fc(x)) * gate(x))), Module / ModuleList
  (torch's, so parameters are named by attribute path as TensorRT-LLM names them).
- models: PretrainedConfig (fields as attributes, `mapping` with tp_size), PretrainedModel,
  MODEL_MAP; graph_rewriting.Layer's layer-type table; tensorrt's LayerType and layer classes.
- the hybrid-attention plugin layer: `fakes.hybrid_attention_op.trtllm_layer`, patched over
  `tidar.plugins.trtllm_plugin.hybrid_attention_trtllm` while the network runs.

Everything else — qkv split and head layout, q/k norms, RoPE tables and rotation, the K/V
writes at the rows' slots, the attribute values given to the plugin, residuals, the final norm,
the outputs and their dtypes — is trtllm_model.py's own code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = ROOT / "export" / "trtllm_model.py"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
          "int64": torch.int64, "bool": torch.bool}


def torch_dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


# ---------------------------------------------------------------- tensors and functional
_marked: dict[str, torch.Tensor] = {}


class Tensor(torch.Tensor):
    """A network tensor (see the module docstring)."""

    def view(self, shape, zero_is_placeholder: bool = True):
        if isinstance(shape, (torch.Tensor, list, tuple)) and not isinstance(shape, torch.Size):
            dims = [int(d) for d in (shape.tolist() if isinstance(shape, torch.Tensor) else shape)]
            return self.reshape(dims)
        return super().view(shape)

    def permute(self, *dims):
        return super().permute(*(dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims))

    def mark_output(self, name: str, dtype=None):
        if dtype is not None and torch_dtype(dtype) != self.dtype:
            raise TypeError(f"output {name!r} is {self.dtype}, marked {dtype}")
        if name in _marked:
            raise ValueError(f"output {name!r} marked twice")
        _marked[name] = self.as_subclass(torch.Tensor)


def as_network_tensor(value, dtype) -> Tensor:
    return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).to(
        torch_dtype(dtype)).as_subclass(Tensor)


def _functional() -> types.ModuleType:
    F = types.ModuleType("tensorrt_llm.functional")
    F.Tensor = Tensor

    def constant(array):
        return torch.from_numpy(np.ascontiguousarray(array)).as_subclass(Tensor)

    def concat(inputs, dim=0):
        tensors = [torch.tensor([i], dtype=torch.int32) if isinstance(i, int) else i for i in inputs]
        if any(t.dtype == torch.int64 for t in tensors):
            tensors = [t.long() if t.dtype == torch.int32 else t for t in tensors]
        return torch.cat([t.reshape(1) if t.dim() == 0 else t for t in tensors], dim=dim).as_subclass(Tensor)

    F.constant, F.concat = constant, concat
    F.shape = lambda x, dim=None: (torch.tensor(x.shape[dim]) if dim is not None
                                   else torch.tensor(list(x.shape))).as_subclass(Tensor)
    F.split = lambda x, split_size_or_sections, dim=0: list(torch.split(x, split_size_or_sections, dim=dim))
    F.unsqueeze = lambda x, axis: torch.unsqueeze(x, axis)
    F.expand = lambda x, shape: x.expand([int(d) for d in shape.tolist()])
    F.scatter = lambda x, dim, indices, updates: torch.scatter(x, dim, indices.long(), updates)
    F.arange = lambda start, end, dtype: torch.arange(int(start), int(end), dtype=torch_dtype(dtype)).as_subclass(
        Tensor)
    F.cast = lambda x, dtype: x.to(torch_dtype(dtype))
    F.cos, F.sin = torch.cos, torch.sin
    return F


# ---------------------------------------------------------------- layers
def _parameter(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch_dtype(dtype)), requires_grad=False)


def _single_rank(tp_size: int) -> None:
    if tp_size != 1:
        raise NotImplementedError(f"the TensorRT-LLM stand-in runs tp_size 1 only, got {tp_size}")


class ColumnLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1,
                 gather_output=True, **_):
        super().__init__()
        _single_rank(tp_size)
        self.weight = _parameter((out_features // tp_size, in_features), dtype)
        self.bias = _parameter((out_features // tp_size,), dtype) if bias else None

    def forward(self, x):
        out = x @ self.weight.T
        return out + self.bias if self.bias is not None else out


class RowLinear(ColumnLinear):
    def __init__(self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1, **_):
        nn.Module.__init__(self)
        _single_rank(tp_size)
        self.weight = _parameter((out_features, in_features // tp_size), dtype)
        self.bias = _parameter((out_features,), dtype) if bias else None


class Embedding(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, dtype=None, **_):
        super().__init__()
        self.weight = _parameter((num_embeddings, embedding_dim), dtype)

    def forward(self, ids):
        return self.weight[ids.long()]


class RmsNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-06, elementwise_affine=True, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = _parameter(normalized_shape, dtype)

    def forward(self, x):
        wide = x.float()
        y = (wide / torch.sqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight


class GatedMLP(nn.Module):
    def __init__(self, hidden_size, ffn_hidden_size, hidden_act, bias=True, dtype=None, tp_group=None, tp_size=1,
                 **_):
        super().__init__()
        if hidden_act != "silu":
            raise NotImplementedError(f"the TensorRT-LLM stand-in has no activation {hidden_act!r}")
        self.fc = ColumnLinear(hidden_size, ffn_hidden_size, bias, dtype, tp_group, tp_size, gather_output=False)
        self.proj = RowLinear(ffn_hidden_size, hidden_size, bias, dtype, tp_group, tp_size)
        self.gate = ColumnLinear(hidden_size, ffn_hidden_size, bias, dtype, tp_group, tp_size, gather_output=False)

    def forward(self, x):
        return self.proj(torch.nn.functional.silu(self.fc(x)) * self.gate(x))


# ---------------------------------------------------------------- models, graph rewriting, tensorrt
class Mapping:
    def __init__(self, world_size=1, tp_size=1, pp_size=1, rank=0, **_):
        self.world_size, self.tp_size, self.pp_size, self.rank = world_size, tp_size, pp_size, rank
        self.tp_group = list(range(tp_size))


class PretrainedConfig:
    def __init__(self, *, architecture, dtype, hidden_size, num_hidden_layers, num_attention_heads, vocab_size=None,
                 hidden_act="gelu", norm_epsilon=1e-5, num_key_value_heads=None, intermediate_size=None,
                 mapping=None, head_size=None, qk_layernorm=False, **kwargs):
        self.architecture, self.dtype, self.hidden_size = architecture, dtype, hidden_size
        self.num_hidden_layers, self.num_attention_heads, self.vocab_size = num_hidden_layers, num_attention_heads, \
            vocab_size
        self.hidden_act, self.norm_epsilon, self.intermediate_size = hidden_act, norm_epsilon, intermediate_size
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_size = head_size if head_size is not None else hidden_size // num_attention_heads
        self.qk_layernorm = qk_layernorm
        self.mapping = Mapping(**(mapping or {}))
        for key, value in kwargs.items():
            setattr(self, key, value)

    def set_if_not_exist(self, key, value):
        if not hasattr(self, key):
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, config: dict):
        return cls(**config)


class PretrainedModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.check_config(config)

    def check_config(self, config):
        pass


class LayerType:
    PLUGIN_V2, PLUGIN_V3 = "PLUGIN_V2", "PLUGIN_V3"


class GraphRewritingLayer:
    """tensorrt_llm.graph_rewriting.Layer's table, as TensorRT-LLM 1.2 ships it (PLUGIN_V3 missing)."""

    TRT_LAYER_TYPE_TO_LAYER: dict = {}


def tensorrt_module() -> types.ModuleType:
    """tensorrt's LayerType and layer classes (TensorRT's compiled module does not load here)."""
    trt = types.ModuleType("tensorrt")
    trt.LayerType = LayerType
    trt.ILayer, trt.IPluginV2Layer, trt.IPluginV3Layer = (type(name, (), {}) for name in
                                                          ("ILayer", "IPluginV2Layer", "IPluginV3Layer"))
    return trt


def _modules() -> dict[str, types.ModuleType]:
    def module(name, **members):
        found = types.ModuleType(name)
        found.__dict__.update(members)
        return found

    trt = tensorrt_module()
    layer_table = type("Layer", (GraphRewritingLayer,), {"TRT_LAYER_TYPE_TO_LAYER": {LayerType.PLUGIN_V2:
                                                                                    trt.IPluginV2Layer}})
    return {
        "tensorrt": trt,
        "tensorrt_llm": module("tensorrt_llm", __path__=[]),
        "tensorrt_llm.functional": _functional(),
        "tensorrt_llm._utils": module("tensorrt_llm._utils", str_dtype_to_trt=torch_dtype),
        "tensorrt_llm.graph_rewriting": module("tensorrt_llm.graph_rewriting", Layer=layer_table),
        "tensorrt_llm.layers": module("tensorrt_llm.layers", ColumnLinear=ColumnLinear, Embedding=Embedding,
                                      GatedMLP=GatedMLP, RmsNorm=RmsNorm, RowLinear=RowLinear),
        "tensorrt_llm.models": module("tensorrt_llm.models", __path__=[], MODEL_MAP={}),
        "tensorrt_llm.models.modeling_utils": module("tensorrt_llm.models.modeling_utils",
                                                     PretrainedConfig=PretrainedConfig,
                                                     PretrainedModel=PretrainedModel),
        "tensorrt_llm.module": module("tensorrt_llm.module", Module=nn.Module, ModuleList=nn.ModuleList),
    }


@contextlib.contextmanager
def _installed(modules: dict[str, types.ModuleType]):
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def model_module() -> types.ModuleType:
    """export/trtllm_model.py executed over the stand-ins (a private copy; tidar.export.trtllm_model
    is untouched)."""
    spec = importlib.util.spec_from_file_location("trtllm_model_on_standins", MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    with _installed({**_modules(), spec.name: module}):  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    if module.TRTLLM_IMPORT_ERROR is not None:
        raise RuntimeError(f"trtllm_model.py did not take the stand-ins: {module.TRTLLM_IMPORT_ERROR}")
    return module


# ---------------------------------------------------------------- the network
class Network:
    """TiDARForCausalLM of a TensorRT-LLM checkpoint (rank 0) on the stand-ins."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.module = model_module()
        self.checkpoint = json.loads((folder / "config.json").read_text())
        config = self.module.TiDARTRTLLMConfig.from_dict(self.checkpoint)
        self.model = self.module.TiDARForCausalLM(config).eval()
        weights = load_file(str(folder / "rank0.safetensors"))
        params = dict(self.model.named_parameters())
        if set(weights) != set(params):
            raise ValueError(f"rank0.safetensors and the model differ in {sorted(set(weights) ^ set(params))[:3]}")
        for name, tensor in weights.items():
            if tensor.shape != params[name].shape or tensor.dtype != params[name].dtype:
                raise ValueError(f"{name}: stored {tuple(tensor.shape)} {tensor.dtype}, declared "
                                 f"{tuple(params[name].shape)} {params[name].dtype}")
            params[name].data.copy_(tensor)
        self.specs = self.module.input_specs(self.checkpoint)

    def __call__(self, feeds: dict) -> dict[str, torch.Tensor]:
        """Run the network on `feeds` ({input name: array or tensor}, cast to the declared input
        dtypes); returns the marked outputs in the order of `output_names`."""
        from fakes.hybrid_attention_op import trtllm_layer
        from tidar.plugins import trtllm_plugin

        inputs = {spec.name: as_network_tensor(feeds[spec.name], spec.dtype) for spec in self.specs}
        past = [inputs.pop(name) for name in list(inputs) if name.startswith("past_") and name != "past_lens"]
        _marked.clear()
        real = trtllm_plugin.hybrid_attention_trtllm
        trtllm_plugin.hybrid_attention_trtllm = trtllm_layer
        try:
            with torch.no_grad():
                self.model.forward(**inputs, past_key_values=past)
        finally:
            trtllm_plugin.hybrid_attention_trtllm = real
        names = self.module.output_names(self.checkpoint)
        if list(_marked) != names:
            raise ValueError(f"the network marked {list(_marked)}, expected {names}")
        return dict(_marked)


def load_network(folder: Path) -> Network:
    return Network(folder)

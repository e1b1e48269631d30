"""ONNX Runtime backend: runs the graphs written by `tidar.export.onnx_export` (standard lowering).

Two sessions: the decode step, which outputs the final-norm hidden states of the new tokens,
and the LM-head graph, which turns the rows the decode loop picks into float32 logits. The
backend offers `hidden_states` and `head` (base.py), so the loop runs the head on the rows
it needs only (docs/design.md §3.2, §3.8); `forward` is the head on every row.

It implements the `Backend` protocol of base.py, so `DecodeEngine` drives it unchanged. The
cache is the runtime's own `KVCache` (torch tensors, so commit / row / remove_rows / grow keep
working). Nothing of it is copied per step: each forward binds (ONNX Runtime IO binding, by
data pointer) every layer's keys and values of the active rows, all `capacity` slots, as the
graph's `past` inputs, read in place; the graph masks the slots from each row's length on and
returns the new tokens' K/V only (export/onnx_export.py), into buffers bound the same way, and
one indexed store per K and V puts them at slots lengths[r] .. lengths[r] + num_new - 1 of
every layer, uncommitted, exactly as the torch backend's `KVCache.write`. Host work per step is
O(new tokens); attention reads the whole capacity, masked (as CUDA graphs do, cuda_graphs.py), so
the decode loop keeps the capacity near what the rows use (`reads_whole_cache`, `KVCache.fit`).

onnxruntime is imported when a backend is created, so the rest of the runtime works without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tidar.runtime.cache import KVCache
from tidar.runtime.config import TiDARConfig
from tidar.runtime.layout import Layout
from .base import BackendBase

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(double)": torch.float64}
"""The step graph's cache type (its past_key_0 input) -> the KV cache's torch dtype."""
HIDDEN_STATES = "hidden_states"


def new_kv_name(kind: str, layer: int) -> str:
    """The standard step graph's output of the new tokens' `kind` ("key" or "value") at `layer`
    (export/onnx_export.py `output_names`; tests/test_onnx.py checks that the two agree)."""
    return f"new_{kind}_{layer}"


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("the ONNX Runtime backend needs the `onnxruntime` package: "
                          "pip install 'tidar-trt[export]' (or pip install onnxruntime)") from error
    return onnxruntime


class OnnxRuntimeBackend(BackendBase):
    """A decode-step graph and its LM-head graph executed by ONNX Runtime on the CPU execution
    provider."""

    name = "onnxruntime"
    reads_whole_cache = True

    def __init__(self, model_path: str | Path, head_path: str | Path, config: TiDARConfig, threads: int = 0):
        """`model_path`: a .onnx file of `export_decode_step(..., attention="standard")`;
        `head_path`: the LM-head graph written with it; `threads`: ONNX Runtime intra-op threads
        (0: its default)."""
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Workers sleep between runs instead of spinning: the step graph and the LM-head graph run
        # alternately, and in a server other threads (Triton's, the scheduler's) need the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.config = config
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.head_session = ort.InferenceSession(str(head_path), options, providers=["CPUExecutionProvider"])
        inputs = {graph_input.name: graph_input for graph_input in self.session.get_inputs()}
        self.dtype = _TORCH_DTYPES[inputs["past_key_0"].type]
        self.model_path = Path(model_path)
        outputs = {output.name for output in self.session.get_outputs()}
        expected = [HIDDEN_STATES, *(new_kv_name(kind, layer) for layer in range(config.num_hidden_layers)
                                     for kind in ("key", "value"))]
        missing = [name for name in expected if name not in outputs]
        if missing:
            raise ValueError(f"{model_path}: the step graph has no output {missing[0]!r} (outputs: "
                             f"{', '.join(sorted(outputs)[:4])}, ...); a graph that returns present_* was exported "
                             "before the backend read the cache in place: build it again with tidar-export build")
        self.head_input = self.head_session.get_inputs()[0].name
        self.head_output = self.head_session.get_outputs()[0].name
        widths = {"decode step": self.session.get_outputs()[0].shape[-1],
                  "LM head": self.head_session.get_inputs()[0].shape[-1]}
        if set(widths.values()) != {config.hidden_size}:
            raise ValueError(f"{model_path}, {head_path}: hidden widths {widths} do not match config.json's "
                             f"hidden_size {config.hidden_size}")
        self._scalars: dict[tuple, dict[str, torch.Tensor]] = {}  # the layout scalars, per layout

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim, dtype=self.dtype)

    def hidden_states(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states [B, layout.num_new, hidden]; the new K/V are written into
        `cache`, uncommitted."""
        batch, num_new = input_ids.shape
        if num_new != layout.num_new:
            raise ValueError(f"{num_new} input tokens for a layout of {layout.num_new}")
        past = cache.max_length()
        if past + num_new > cache.capacity:
            raise ValueError(f"KV cache capacity {cache.capacity} is too small for {past + num_new} slots")
        if cache.device.type != "cpu" or cache.keys.dtype != self.dtype:
            raise ValueError(f"the KV cache is {cache.keys.dtype} on {cache.device}; {self.model_path} "
                             f"reads {self.dtype} on the CPU (make it with this backend's new_cache)")
        layers, c = self.config.num_hidden_layers, self.config
        binding = self.session.io_binding()
        input_ids = input_ids.to("cpu", torch.long).contiguous()
        past_lens = cache.lengths.to("cpu", torch.long).contiguous()
        hidden = torch.empty(batch, num_new, c.hidden_size, dtype=self.dtype)
        new_keys = torch.empty(layers, batch, c.num_key_value_heads, num_new, c.head_dim, dtype=self.dtype)
        new_values = torch.empty_like(new_keys)
        _bind(binding.bind_input, "input_ids", input_ids)
        _bind(binding.bind_input, "past_lens", past_lens)
        for name, value in self._layout_scalars(layout).items():
            _bind(binding.bind_input, name, value)
        keys, values = cache.keys, cache.values  # [layers, batch, kv_heads, capacity, head_dim] views
        _bind(binding.bind_output, HIDDEN_STATES, hidden)
        for layer in range(layers):
            for kind, storage, new in (("key", keys, new_keys), ("value", values, new_values)):
                _bind(binding.bind_input, f"past_{kind}_{layer}", storage[layer])
                _bind(binding.bind_output, new_kv_name(kind, layer), new[layer])
        self.session.run_with_iobinding(binding)
        # The new tokens' K/V of every layer at slots lengths[r] + j (KVCache.write's rule, all layers at once).
        rows = torch.arange(batch)[:, None]
        slots = past_lens[:, None] + torch.arange(num_new)
        # Both as views [batch, slots, layers, kv_heads, head_dim], so the indexed dims lead (half the time of
        # indexing dims 1 and 3 of the cache as it is laid out).
        keys.permute(1, 3, 0, 2, 4)[rows, slots] = new_keys.permute(1, 3, 0, 2, 4)
        values.permute(1, 3, 0, 2, 4)[rows, slots] = new_values.permute(1, 3, 0, 2, 4)
        return hidden

    def _layout_scalars(self, layout: Layout) -> dict[str, torch.Tensor]:
        """The layout's kernel scalars as 0-d int64 tensors, made once per layout."""
        scalars = layout.kernel_scalars()
        key = tuple(scalars.values())
        if key not in self._scalars:
            self._scalars[key] = {name: torch.tensor(value, dtype=torch.long) for name, value in scalars.items()}
        return self._scalars[key]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, R, vocab] of hidden states [B, R, hidden] (the LM-head graph)."""
        rows = hidden.detach().to("cpu", self.dtype).contiguous().numpy()
        (logits,) = self.head_session.run([self.head_output], {self.head_input: rows})
        return torch.from_numpy(logits)


def _bind(bind, name: str, tensor: torch.Tensor) -> None:
    """Bind graph input or output `name` to the memory of the CPU tensor `tensor` (no copy)."""
    if not tensor.is_contiguous():
        raise ValueError(f"graph tensor {name!r}: a strided view {tuple(tensor.shape)} cannot be bound in place")
    bind(name, "cpu", 0, _NUMPY_OF[tensor.dtype], list(tensor.shape), tensor.data_ptr())


_NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64}

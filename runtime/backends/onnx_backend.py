"""ONNX Runtime backend: runs the graphs written by `tidar.export.onnx_export` (standard lowering).

Two sessions: the decode step, which outputs the final-norm hidden states of the new tokens,
and the LM-head graph, which turns the rows the decode loop picks into float32 logits. The
backend offers `hidden_states` and `head` (base.py), so the loop runs the head on the rows
it needs only (docs/design.md §3.2, §3.8); `forward` is the head on every row.

It implements the `Backend` protocol of base.py, so `DecodeEngine` drives it unchanged. The
cache is the runtime's own `KVCache` (torch tensors, so commit / row / keep_rows / concat keep
working); each forward hands the first `max(lengths)` slots of every layer to the graph as
numpy arrays and copies the graph's `present` tensors back over the first
`max(lengths) + num_new` slots, which puts the new tokens' K/V after each row's cached length
without committing them, exactly as the torch backend does.

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

_NUMPY_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(double)": torch.float64}


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
        self.dtype = _NUMPY_DTYPES[inputs["past_key_0"].type]
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.head_input = self.head_session.get_inputs()[0].name
        self.head_output = self.head_session.get_outputs()[0].name
        widths = {"decode step": self.session.get_outputs()[0].shape[-1],
                  "LM head": self.head_session.get_inputs()[0].shape[-1]}
        if set(widths.values()) != {config.hidden_size}:
            raise ValueError(f"{model_path}, {head_path}: hidden widths {widths} do not match config.json's "
                             f"hidden_size {config.hidden_size}")

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
        feeds = {"input_ids": input_ids.to("cpu", torch.long).numpy(),
                 "past_lens": cache.lengths.to("cpu", torch.long).numpy()}
        feeds.update({name: np.array(value, dtype=np.int64) for name, value in layout.kernel_scalars().items()})
        for layer in range(self.config.num_hidden_layers):
            for kind, tensor in (("key", cache.keys), ("value", cache.values)):
                feeds[f"past_{kind}_{layer}"] = np.ascontiguousarray(tensor[layer, :, :, :past].detach().cpu().numpy())
        hidden, *present = self.session.run(self.output_names, feeds)
        for layer in range(self.config.num_hidden_layers):
            cache.keys[layer, :, :, :past + num_new] = torch.from_numpy(present[2 * layer])
            cache.values[layer, :, :, :past + num_new] = torch.from_numpy(present[2 * layer + 1])
        return torch.from_numpy(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, R, vocab] of hidden states [B, R, hidden] (the LM-head graph)."""
        rows = np.ascontiguousarray(hidden.detach().to("cpu", self.dtype).numpy())
        (logits,) = self.head_session.run([self.head_output], {self.head_input: rows})
        return torch.from_numpy(logits)

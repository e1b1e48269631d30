"""The executor protocol the decode loop calls, and the artifacts every executor shares.

The decode loop (runtime/generate.py) drives any executor through `Backend`: a KV cache it can
commit and truncate per row, the final-norm hidden states of one forward over the new tokens of
a `Layout` (their K/V written after each row's cached length, uncommitted), and the LM head on
the rows it picks from them. The loop runs the head only on the rows it needs, in two goes: the
verification rows, then the masks of the block the verification selected (docs/design.md §3.2
"Logits only where needed", §3.8). `BackendBase.forward` (logits of every new token) is derived
from the two.

Executors: torch_backend.py (PyTorch, CUDA graphs), onnx_backend.py (ONNX Runtime),
engine_backend.py (TensorRT and TensorRT-LLM engines); loading.py opens one by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from tidar.runtime.cache import KVCache
from tidar.runtime.config import TiDARConfig
from tidar.runtime.layout import Layout
from tidar.runtime.model import gather_rows

BACKENDS = ("torch", "onnxruntime", "tensorrt", "trtllm")
"""Executor names, as `--backend` and the Triton repository's `backend` parameter take them."""

STEP_GRAPH = "onnx/decode_step.onnx"
"""The decode-step graph (standard lowering) in a `tidar-export build` output."""
HEAD_GRAPH = "onnx/lm_head.onnx"
"""The LM-head graph in a `tidar-export build` output; the engine backends read its weight too."""
TENSORRT_ENGINE = "tensorrt/decode_step.engine"
TRTLLM_ENGINE = "engine/rank0.engine"
TRTLLM_WEIGHTS = "trtllm/rank0.safetensors"
"""The TensorRT-LLM checkpoint's rank file (tp = 1), whose lm_head.weight the trtllm backend applies."""


@runtime_checkable
class Backend(Protocol):
    """What the decode loop calls on an executor."""

    name: str
    config: TiDARConfig
    reads_whole_cache: bool
    """Whether a forward's cost grows with the cache's capacity rather than with the rows' lengths
    (it attends over every slot, masked): the decode loop then keeps the capacity close to what the
    rows use (`KVCache.fit`) unless the cache was sized once for the server's lifetime."""

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for `batch` rows of `capacity` slots."""

    def hidden_states(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states [B, layout.num_new, H] of the new tokens `input_ids`
        [B, num_new]; their K/V are written into `cache` after each row's cached length, uncommitted."""

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., vocab] of hidden states [..., H]."""


class BackendBase:
    """`forward` for an executor that has `hidden_states` and `head`: logits of every new token."""

    reads_whole_cache = False

    def forward(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Logits [B, layout.num_new, vocab] (float32); the new K/V are written into `cache`,
        uncommitted."""
        return self.head(self.hidden_states(input_ids, layout, cache))


class StepLogits:
    """The logits of one forward's new tokens, computed at the query indices the loop asks for:
    the forward runs once, the LM head on the picked tokens only."""

    def __init__(self, backend: Backend, input_ids: torch.Tensor, layout: Layout, cache: KVCache):
        self._head = backend.head
        self._states = backend.hidden_states(input_ids, layout, cache)

    def at(self, query_index: torch.Tensor) -> torch.Tensor:
        """Logits [B, Q, vocab] at `query_index` [B, Q] (indices among the new tokens)."""
        return self._head(gather_rows(self._states, query_index))


def head_graph_weight(path: str | Path, config: TiDARConfig) -> torch.Tensor:
    """The weight [vocab, hidden] of the LM-head graph `path` (its one initializer of that shape,
    read from the external-data file it points at), as stored (the graph's dtype)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ImportError(f"reading the LM head of {path} needs the `onnx` package: pip install onnx") from error
    graph = onnx.load(str(path), load_external_data=False)
    shape = [config.vocab_size, config.hidden_size]
    found = [tensor for tensor in graph.graph.initializer if list(tensor.dims) == shape]
    if len(found) != 1:
        raise ValueError(f"{path}: {len(found)} initializers of shape {shape} (vocab, hidden); an LM-head "
                         "graph has one")
    onnx.external_data_helper.load_external_data_for_tensor(found[0], str(Path(path).parent))
    return torch.from_numpy(numpy_helper.to_array(found[0]).copy())

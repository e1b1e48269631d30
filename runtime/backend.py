"""The small protocol every executor implements, and the PyTorch reference backend.

The decode loop (generate.py) needs only: the model config, a KV cache it can commit and
truncate per row, and one forward over the new tokens of a `Layout` that returns their
logits and writes their K/V after each row's cached length. ONNX Runtime, TensorRT and
TensorRT-LLM backends implement the same three members.

Every backend here also offers `hidden_states` (the same forward, returning the final-norm
hidden states) and `head` (the LM head on the rows picked from them, float32 logits). The loop
then runs the head only on the rows it needs, in two goes: the verification rows, then the
masks of the block the verification selected (docs/design.md §3.2 "Logits only where
needed", §3.8). A backend with `forward` alone (a test double) still works: its full logits
are indexed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from .cache import KVCache
from .config import TiDARConfig
from .layout import Layout
from .cuda_graphs import GraphedForward, graphed_forward
from .model import TiDARModel, gather_rows

BACKENDS = ("torch", "onnxruntime", "tensorrt", "trtllm")


class Backend(Protocol):
    config: TiDARConfig

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for `batch` rows of `capacity` slots."""

    def forward(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Logits [B, layout.num_new, vocab] of the new tokens `input_ids` [B, num_new]."""


class SplitHead:
    """`forward` of a backend whose step ends at the hidden states: the head on every row."""

    def forward(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Logits [B, layout.num_new, vocab] (float32); the new K/V are written into `cache`,
        uncommitted."""
        return self.head(self.hidden_states(input_ids, layout, cache))


class StepLogits:
    """The logits of one forward's new tokens, computed for the rows the loop asks for: with a
    backend that has `hidden_states` and `head` (every backend of this module), the LM head runs
    on those rows only; with `forward` alone (a test double), its full logits are indexed."""

    def __init__(self, backend: Backend, input_ids: torch.Tensor, layout: Layout, cache: KVCache):
        self._head = getattr(backend, "head", None)
        if self._head is not None and hasattr(backend, "hidden_states"):
            self._states = backend.hidden_states(input_ids, layout, cache)
        else:
            self._head = None
            self._states = backend.forward(input_ids, layout, cache)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits [B, R, vocab] at `rows` [B, R] (indices among the new tokens)."""
        picked = gather_rows(self._states, rows)
        return picked if self._head is None else self._head(picked)


class TorchBackend:
    """The reference model in PyTorch (eager, SDPA, FlexAttention or Triton-kernel attention); on
    CUDA its decode steps run as CUDA graphs (cuda_graphs.py) unless turned off."""

    name = "torch"

    def __init__(self, model: TiDARModel, cuda_graphs: bool | None = None):
        """`cuda_graphs`: None (default) = on when the model is on a CUDA device and its attention
        can be captured; True = on (a ValueError naming the option where it cannot be); False = off."""
        self.model = model
        self.config = model.config
        self.graphs: GraphedForward | None = graphed_forward(model, cuda_graphs)
        """The graphed decode steps (None: every forward is eager)."""

    @classmethod
    def load(cls, path: str | Path, dtype: str | None = None, attention: str = "eager",
             device: str = "cpu", cuda_graphs: bool | None = None) -> "TorchBackend":
        from .checkpoint import load_model

        return cls(load_model(path, dtype=dtype, attention=attention, device=device), cuda_graphs=cuda_graphs)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.model.new_cache(batch, capacity)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, layout, cache)
        return self.head(hidden if logits_rows is None else gather_rows(hidden, logits_rows))

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states [B, num_new, hidden] of the new tokens (K/V written as by
        `forward`); `head` turns the rows the caller picks into logits. A decode step on a whole
        cache replays its CUDA graph when graphs are on."""
        input_ids = input_ids.to(self.model.device)
        if self.graphs is not None and self.graphs.handles(layout, cache):
            return self.graphs(input_ids, layout, cache)
        return self.model.hidden_states(input_ids, layout, cache)

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states [..., hidden]: logits [..., vocab]."""
        return self.model.lm_head(hidden)


def load_backend(name: str, path: str | Path, **options) -> Backend:
    """Open the checkpoint or export at `path` with the executor `name`."""
    if name == "torch":
        return TorchBackend.load(path, **options)
    if name == "onnxruntime":
        return load_onnxruntime(path, **options)
    if name in ("tensorrt", "trtllm"):
        return load_engine(name, path, **options)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


def load_onnxruntime(path: str | Path, dtype: str | None = None, attention: str = "eager", threads: int = 0):
    """The ONNX Runtime backend of a `tidar-export build` output: OUT/onnx/decode_step.onnx
    (standard lowering) and OUT/onnx/lm_head.onnx with OUT/config.json. The graph fixes dtype and
    attention: `dtype` may only name the graph's own, `attention` only "eager" (the graph's
    dense-mask attention)."""
    from .checkpoint import CheckpointError
    from .onnx_backend import HEAD_GRAPH, STEP_GRAPH, OnnxRuntimeBackend

    folder = Path(path)
    graph = folder / STEP_GRAPH
    for relative in (STEP_GRAPH, HEAD_GRAPH):
        if not (folder / relative).is_file():
            raise CheckpointError(f"{folder}: no {relative}; the onnxruntime backend opens the output folder of "
                                  "`tidar-export build` (an export made before the LM head became its own graph "
                                  "lacks onnx/lm_head.onnx: build it again)")
    if attention != "eager":
        raise CheckpointError(f"{graph}: attention {attention!r} is a torch backend option; the graph has its "
                              "own (eager) attention")
    backend = OnnxRuntimeBackend(graph, folder / HEAD_GRAPH, TiDARConfig.from_file(folder), threads=threads)
    if dtype is not None and backend.dtype != getattr(torch, dtype, None):
        raise CheckpointError(f"{graph}: the graph computes in {str(backend.dtype).removeprefix('torch.')}, "
                              f"not {dtype}")
    return backend


def load_engine(name: str, path: str | Path, dtype: str | None = None, attention: str = "eager", **_unused):
    """The TensorRT ("tensorrt") or TensorRT-LLM ("trtllm") engine of a `tidar-export build`
    output (runtime/engine_backend.py); GPU hosts only. The engine fixes dtype and attention."""
    from .checkpoint import CheckpointError
    from .engine_backend import EngineBackend, EngineUnavailable

    try:
        backend = getattr(EngineBackend, name)(path)
    except EngineUnavailable as exc:
        raise CheckpointError(str(exc)) from None
    if dtype is not None and backend.dtype != getattr(torch, dtype, None):
        raise CheckpointError(f"{path}: the {name} engine computes in {str(backend.dtype).removeprefix('torch.')}, "
                              f"not {dtype}")
    return backend

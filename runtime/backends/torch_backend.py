"""The PyTorch backend: the reference model as an executor (eager, SDPA, FlexAttention or
Triton-kernel attention), its decode steps replayed as CUDA graphs on CUDA (cuda_graphs.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tidar.runtime.cache import KVCache
from tidar.runtime.layout import Layout
from tidar.runtime.model import TiDARModel, gather_rows
from .base import BackendBase
from .cuda_graphs import GraphedForward, graphed_forward


class TorchBackend(BackendBase):
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
             device: str = "cpu", cuda_graphs: bool | None = None, mask_token_id: int | None = None,
             block_size: int | None = None) -> "TorchBackend":
        from tidar.runtime.checkpoint import load_model

        return cls(load_model(path, dtype=dtype, attention=attention, device=device, mask_token_id=mask_token_id,
                              block_size=block_size), cuda_graphs=cuda_graphs)

    @property
    def device(self) -> torch.device:
        """Where the model and its caches are."""
        return self.model.device

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

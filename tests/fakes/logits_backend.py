"""`LogitsBackend`: a base for test doubles of an executor that compute logits directly.

The typed `Backend` protocol (runtime/backends/base.py) asks for `hidden_states` and `head`; a
double that knows its logits implements `logits(input_ids, layout, cache)` and gets both: its
"hidden states" are the logits and its head is the identity (float32)."""

from __future__ import annotations

import torch

from tidar.runtime.backends.base import BackendBase


class LogitsBackend(BackendBase):
    name = "fake"

    def logits(self, input_ids: torch.Tensor, layout, cache) -> torch.Tensor:
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor, layout, cache) -> torch.Tensor:
        return self.logits(input_ids, layout, cache)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float()

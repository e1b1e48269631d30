"""The full-mask TiDAR training objective (docs/design.md §2).

Input of length 2S: the clean tokens x_0..x_{S-1}, then S mask tokens; mask i takes position
i. Attention is the runtime's `Layout.training(S, b)`: the clean half is causal and never sees
masks; the block of masks starting at position p sees the clean tokens before p and its own
block. Labels: AR is shifted (the output at x_i predicts x_{i+1}), diffusion is aligned (the
output at mask i predicts x_i). Loss: 1/(1+alpha) * (alpha * mean CE_AR + mean CE_diff).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tidar.runtime.layout import Layout
from tidar.runtime.model import TiDARModel


@dataclass
class Losses:
    total: torch.Tensor
    ar: torch.Tensor
    diffusion: torch.Tensor


def full_mask_inputs(tokens: torch.Tensor, mask_token_id: int, block_size: int) -> tuple[torch.Tensor, Layout]:
    """[B, S] clean tokens -> ([B, 2S] clean + masks, the training layout)."""
    batch, seq_len = tokens.shape
    masks = torch.full((batch, seq_len), mask_token_id, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([tokens, masks], dim=1), Layout.training(seq_len, block_size)


def losses_from_logits(logits: torch.Tensor, tokens: torch.Tensor, alpha: float = 1.0) -> Losses:
    """logits [B, 2S, V] of the doubled sequence, tokens [B, S] the clean half."""
    seq_len = tokens.shape[1]
    vocab = logits.shape[-1]
    ar = F.cross_entropy(logits[:, : seq_len - 1].reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1))
    diffusion = F.cross_entropy(logits[:, seq_len:].reshape(-1, vocab).float(), tokens.reshape(-1))
    return Losses((alpha * ar + diffusion) / (1.0 + alpha), ar, diffusion)


def full_mask_loss(model: TiDARModel, tokens: torch.Tensor, alpha: float = 1.0) -> Losses:
    """The objective for a batch of clean sequences (S a multiple of the model's block size)."""
    inputs, layout = full_mask_inputs(tokens, model.config.mask_token_id, model.config.block_size)
    return losses_from_logits(model(inputs, layout), tokens, alpha)

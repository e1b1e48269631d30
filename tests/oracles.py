"""Test oracles: per-row reference algorithms the runtime's batched code is checked against.

- `probabilities`: the processed distribution of one request's settings (temperature, top-k,
  top-p), for goodness-of-fit tests of the seeded sampler (tests/test_sampling.py).
- `verify_greedy` and `verify_sampled`: greedy verification and standard speculative sampling
  with a residual (Leviathan et al.; Chen et al.), one row at a time with a torch Generator, the
  references for `SamplingBatch.verify` and `verify_residual` (runtime/sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidar.runtime.sampling import SamplingParams, process_logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The processed distribution (float32) over the last dim: temperature, then top-k, then top-p.
    Greedy settings (temperature 0) give the one-hot distribution of the argmax."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    shape, device = logits.shape[:-1], logits.device
    top_k = torch.full(shape, params.top_k, device=device) if params.top_k else None
    top_p = torch.full(shape, float(params.top_p), device=device) if params.top_p < 1.0 else None
    x = process_logits(logits, torch.full(shape, float(params.temperature), device=device), top_k, top_p)
    return torch.softmax(x, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sample per row of a [n, V] (or [V]) probability tensor."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


@dataclass


class Verdict:
    accepted: int
    """Proposals accepted (0 .. number of proposals); the step commits accepted + 1 tokens."""
    next_token: int
    """The correction (first rejected position) or the bonus token (all accepted)."""


def verify_greedy(proposal_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """proposal_tokens [n] (drafts d_1..d_n), target_logits [n + 1, V] (positions L+1..L+n+1)."""
    choice = target_logits.argmax(dim=-1)
    matches = (proposal_tokens == choice[: proposal_tokens.shape[0]]).long()
    accepted = int(matches.cumprod(0).sum()) if matches.numel() else 0
    return Verdict(accepted, int(choice[accepted]))


def verify_sampled(proposal_tokens: torch.Tensor, proposal_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator) -> Verdict:
    """Speculative sampling. proposal_tokens [n] drawn from proposal_probs [n, V] (q); target_probs
    [n + 1, V] (p) for the same positions plus the bonus position."""
    n = proposal_tokens.shape[0]
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64)
    for i in range(n):
        token = int(proposal_tokens[i])
        p, q = float(target_probs[i, token]), float(proposal_probs[i, token])
        if uniforms[i] * q < p:  # u < p / q, without dividing by a q that underflowed
            continue
        residual = (target_probs[i] - proposal_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to round-off: the residual is p itself
            residual = target_probs[i]
        return Verdict(i, int(sample(residual / residual.sum(), generator)))
    return Verdict(n, int(sample(target_probs[n], generator)))

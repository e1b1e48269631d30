"""Sampling settings, logit processing and draft verification (SPEC §3, "Verification").

Greedy: a draft is accepted while it equals the argmax of the target logits.
Sampling: drafts are samples of the diffusion distribution q; a draft d is accepted with
probability min(1, p(d) / q(d)) and the first rejected one is replaced by a sample of
normalize(max(0, p - q)); when every draft is accepted the bonus token is a sample of p.
That is standard speculative sampling: the committed tokens are distributed exactly as AR
samples from p. p and q are the *processed* distributions (temperature, top-k, top-p).

Every random draw of a row comes from that row's own `torch.Generator`, in a fixed order
(one uniform per verified draft, then the next token, then the next drafts), so a row's
output does not depend on which other rows share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Sampling settings out of range; the message names the setting."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens."""

    temperature: float = 0.0
    """0 selects greedy decoding; otherwise logits are divided by it before softmax."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seed of the row's random generator (None: drawn from torch's global generator)."""

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2 ** 64):
            raise SamplingError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator:
        generator = torch.Generator()
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        generator.manual_seed(seed % 2 ** 63)
        return generator


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The processed distribution (float32) over the last dim: temperature, then top-k, then top-p.
    Greedy settings (temperature 0) give the one-hot distribution of the argmax."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # the first token is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


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


def verify_greedy(proposals: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """proposals [n] (drafts d_1..d_n), target_logits [n + 1, V] (positions L+1..L+n+1)."""
    choice = target_logits.argmax(dim=-1)
    matches = (proposals == choice[: proposals.shape[0]]).long()
    accepted = int(matches.cumprod(0).sum()) if matches.numel() else 0
    return Verdict(accepted, int(choice[accepted]))


def verify_sampled(proposals: torch.Tensor, proposal_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator) -> Verdict:
    """Speculative sampling. proposals [n] drawn from proposal_probs [n, V] (q); target_probs
    [n + 1, V] (p) for the same positions plus the bonus position."""
    n = proposals.shape[0]
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64)
    for i in range(n):
        token = int(proposals[i])
        p, q = float(target_probs[i, token]), float(proposal_probs[i, token])
        if uniforms[i] * q < p:  # u < p / q, without dividing by a q that underflowed
            continue
        residual = (target_probs[i] - proposal_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to round-off: the residual is p itself
            residual = target_probs[i]
        return Verdict(i, int(sample(residual / residual.sum(), generator)))
    return Verdict(n, int(sample(target_probs[n], generator)))

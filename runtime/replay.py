"""Greedy replay: the tokens per step the engine would measure at every draft shape (b, k), from
b forward passes' worth of data per draft length instead of an engine run per shape
(docs/design.md §3.4, "Expected committed tokens").

Greedy decoding is lossless (I1): the engine's output is the AR greedy continuation x of the
prompt whatever the shape. A mask block that sees the sequence before position p (the cache
plus the causal tokens it sees) with its b masks at p..p+b-1 drafts the same tokens whichever
step computes it (§3.2: the K/V of committed tokens is the AR K/V, I3). Call its argmax D_b(p)
(masks 0..b-1). Every proposal the engine ever verifies, at any k, is a run of masks of some
D_b(p): the prefill's block is D_b(len(prompt)); after a step whose d_0 sat at L and which
committed a tokens, the next proposals are masks of D_b(L + 1 + block) with `block`, first mask
and count from `layout.next_proposals`. So with x and D_b at every position, the decode loop
of any k runs on the host (`simulate`) with the engine's rule and counts the engine's steps,
tokens and acceptance exactly.

`block_drafts` computes D_b(p) for all positions of a sequence with one decode forward per
position, batched: rows that hold the K/V of the sequence before p - 1 run
`Layout.decode(b, 1)` on [d_0 = the token at p - 1, b - 1 pad drafts, b masks]; block 1 (the
only one) sees the cache and d_0, its masks sit at p..p+b-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .autotune import as_shape, shape_name
from .backends.base import Backend, StepLogits
from .cache import KVCache
from .counters import Stats
from .generate import DecodeEngine, Request
from .layout import Layout, next_proposals

DEFAULT_CHUNK_ROWS = 32
"""Rows (positions) per batched decode forward in `block_drafts`."""


def tokens_per_decode_step(tokens: int, prefills: int, decode_steps: int) -> float | None:
    """Committed tokens per decode step: the tokens after each request's first (which its prefill
    commits), over the steps after the prefills (None without a step). The definition
    `tidar bench` reports (bench.py `run_runtime`) and the replay predicts."""
    return (tokens - prefills) / decode_steps if decode_steps else None


@dataclass
class ReplayCounts:
    """One shape's counters summed over the prompts: the engine's `Stats` (what `DecodeEngine`
    would count, prefills included), with the shape, the prompts and the output tokens."""

    draft_len: int
    draft_blocks: int
    prompts: int = 0
    tokens: int = 0
    """Output tokens (the prefill's first token included; max_new_tokens per prompt)."""
    stats: Stats = field(default_factory=Stats)

    @property
    def decode_steps(self) -> int:
        """Forward passes after the prefills."""
        return self.stats.forward_passes - self.prompts

    @property
    def accepted_per_position(self) -> list[int]:
        return self.stats.accepted_per_position

    @property
    def proposed_per_position(self) -> list[int]:
        return self.stats.proposed_per_position

    @property
    def tokens_per_step(self) -> float | None:
        return tokens_per_decode_step(self.tokens, self.prompts, self.decode_steps)

    @property
    def tokens_per_forward(self) -> float:
        """T/NFE: tokens over all forwards, prefills included."""
        return self.tokens / self.stats.forward_passes

    @property
    def acceptance(self) -> list[float]:
        """Per position: accepted / proposed there (`Stats.acceptance`)."""
        return self.stats.acceptance

    def add(self, other: "ReplayCounts") -> None:
        """Add another prompt's counters (same shape)."""
        self.prompts += other.prompts
        self.tokens += other.tokens
        self.stats.add(other.stats)


def greedy_continuations(backend: Backend, prompts: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    """The AR greedy continuation of each prompt, `length` tokens (draft length 0, no end ids)."""
    engine = DecodeEngine(backend, draft_len=0)
    return [result.token_ids for result in engine.generate([Request(list(p), length, eos_ids=()) for p in prompts])]


def _prefix_cache(backend: Backend, sequence: Sequence[int], length: int) -> KVCache:
    """A one-row cache holding the K/V of sequence[:length], from one causal forward."""
    cache = backend.new_cache(1, max(length, 1))
    if length:
        StepLogits(backend, torch.tensor([list(sequence[:length])]), Layout.autoregressive(length), cache)
        cache.commit([length])
    return cache


@torch.inference_mode()
def block_drafts(backend: Backend, sequence: Sequence[int], first: int, count: int, draft_len: int,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """D_b(p) for p = first .. first + count - 1 (b = `draft_len`, 1 <= first): [count, b], row
    i the greedy drafts of masks 0..b-1 of the block that sees sequence[:first + i] with its masks
    at first + i ..; `sequence` must reach past position first + count - 2 (each block's d_0)."""
    b = draft_len
    if count <= 0:
        return torch.empty(0, b, dtype=torch.long)
    layout = Layout.decode(b, 1)
    mask_id = backend.config.mask_token_id
    prefix = _prefix_cache(backend, sequence, first + count - 2)
    mask_index = layout.mask_index(0, torch.arange(b))  # query indices of the block's masks
    out = []
    for start in range(first, first + count, chunk_rows):
        positions = list(range(start, min(start + chunk_rows, first + count)))
        pasts = [p - 1 for p in positions]
        cache = backend.new_cache(len(positions), pasts[-1] + layout.num_new)
        for row, past in enumerate(pasts):
            cache.keys[:, row, :, :past] = prefix.keys[:, 0, :, :past]
            cache.values[:, row, :, :past] = prefix.values[:, 0, :, :past]
        cache.lengths = pasts
        tokens = torch.tensor([[sequence[past]] + [mask_id] * (layout.num_new - 1) for past in pasts],
                              device=cache.device)
        logits = StepLogits(backend, tokens, layout, cache).at(mask_index[None].expand(len(positions), -1))
        out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


def simulate(drafts: torch.Tensor | list[list[int]], continuation: Sequence[int], draft_len: int, draft_blocks: int,
             max_new_tokens: int) -> ReplayCounts:
    """The engine's greedy decode loop for one prompt at shape (b, k), run on the host.
    `drafts[t]` = D_b at the position of continuation[t] (t = 0: the prefill's block);
    `continuation` = the AR greedy continuation x (for exact acceptance counters it must reach
    b - 1 tokens past max_new_tokens). As in `DecodeEngine`: the prefill commits x_0 and proposes
    masks 1..b-1 of drafts[0]; a step whose d_0 is x_t verifies its proposals against x (the
    leading run equal to x, never past the proposal count), commits accepted + 1 tokens, and the
    next proposals come from `next_proposals`; generation stops at max_new_tokens."""
    b, k = as_shape((draft_len, draft_blocks))
    rows = drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts
    counts = ReplayCounts(b, k, prompts=1, tokens=max_new_tokens, stats=Stats.positions(b, forward_passes=1))
    t, emitted = 0, 1  # d_0 = x_t; tokens emitted so far (x_0 by the prefill)
    source, first_mask, proposal_count = 0, 1, max(b - 1, 0)  # the prefill's block, masks 1..b-1
    while emitted < max_new_tokens:
        accepted = 0
        while accepted < proposal_count and rows[source][first_mask + accepted] == continuation[t + 1 + accepted]:
            accepted += 1
        counts.stats.add(Stats.of_step(b, proposed=proposal_count, accepted=accepted))
        emitted += accepted + 1
        t += accepted + 1
        if b > 1:
            block, first_mask, proposal_count = next_proposals(accepted, b, k)
            source = t - accepted + block  # block j of the step at the old d_0 sees it and j more
    return counts


def replay(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int, shapes,
           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict[tuple[int, int], ReplayCounts]:
    """Replayed counters of every shape of `shapes` (draft lengths or (b, k); AR and b = 1 commit
    one token per step) summed over `prompts`, greedy, max_new_tokens each, no end ids: what
    `tidar bench` measures with `DecodeEngine` at batch 1. Keys: (b, k)."""
    shapes = sorted({as_shape(s) for s in shapes})
    longest = max((b for b, _ in shapes), default=0)
    limit = backend.config.max_position_embeddings
    if any(len(p) + max_new_tokens + longest > limit for p in prompts):
        raise ValueError(f"a prompt plus max_new_tokens + {longest} exceeds max_position_embeddings = {limit}")
    continuations = greedy_continuations(backend, prompts, max_new_tokens + longest)
    results = {}
    for b in sorted({b for b, _ in shapes}):
        drafts = [block_drafts(backend, list(p) + x, len(p), max_new_tokens - 1, b, chunk_rows) if b > 1 else None
                  for p, x in zip(prompts, continuations)]
        for k in [k for shape_b, k in shapes if shape_b == b]:
            total = ReplayCounts(b, k, stats=Stats.positions(b))
            for rows, x in zip(drafts, continuations):
                total.add(simulate(rows if rows is not None else [], x, b, k, max_new_tokens))
            results[(b, k)] = total
    return results


def replayed_tokens_per_step(results: dict[tuple[int, int], ReplayCounts]) -> dict[str, float]:
    """{"b{b}k{k}": tokens per step} (`autotune.shape_name` keys) of the shapes that took a step."""
    return {shape_name(shape): counts.tokens_per_step for shape, counts in sorted(results.items())
            if counts.tokens_per_step is not None}

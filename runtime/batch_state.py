"""The decode batch's per-row state, in one object kept in one row order (docs/design.md §3.2).

`DecodeEngine` keeps, for every row of its batch, host state (`Row`: the request, its output so
far, its counters, its detokenizer) and device arrays (the pending drafts, the count of real
proposals among them, the drafts' distributions for rows that verify by residual sampling, the
sampling settings, the logits processors' state). `BatchState` owns all of them, and only its
three operations change the set or order of rows or the draft width, so the arrays never fall
out of step (the model is vLLM's `InputBatch`):

  add(rows, drafts, ...)  new rows join at the end;
  keep(order)             the rows left, in `order` (old row indices; the KV cache's
                          `remove_rows` gives it);
  resize(draft_len)       the pending drafts cut or padded to a new draft length.

"Row" always means a row of the batch (one request); a token's index among a forward's new
tokens is its query index (runtime/layout.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import logits_processor
from .counters import Stats
from .logits_processor import LogitsProcessor, ProcessorState
from .ngram import NgramIndex, SourceEstimate
from .sampling import SamplingBatch, SamplingParams
from .tokenizer import IncrementalDetokenizer


@dataclass
class Row:
    """One request's host-side state while it is in the batch."""

    request: object
    """The `Request` (runtime/generate.py)."""
    prompt_ids: list[int]
    eos_ids: frozenset[int]
    seed: int
    """The request's seed, or one drawn at admission (sampled rows)."""
    stats: Stats
    detokenizer: IncrementalDetokenizer | None
    started: float
    """`time.perf_counter()` when the prefill began."""
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    admission: int = -1
    """The engine's number for the request (`Delta.admission`)."""
    proposal_count: int = 0
    """Real proposals among the pending drafts d_1.. (host copy of `BatchState.proposal_counts`)."""
    proposal_source: str = "tidar"
    """Where the pending proposals came from (docs/design.md §3.9)."""
    ngram: NgramIndex | None = None
    """The row's text for n-gram proposals (hybrid and ngram drafters only)."""
    estimates: dict[str, SourceEstimate] = field(default_factory=dict)
    """Per source, the row's acceptance hazards (hybrid and ngram drafters only)."""
    candidates: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Per source, the proposals it offered for the pending step, placed or not (scored when the
    step commits)."""

    def finish(self, reason: str) -> None:
        """End the row with `reason` and record its decode time."""
        self.finish_reason = reason
        self.stats.decode_seconds = time.perf_counter() - self.started - self.stats.prefill_seconds


@dataclass
class NewRows:
    """What prefills hand to `BatchState.add`, one entry per joining row."""

    rows: list[Row]
    drafts: list[torch.Tensor]
    """[1, max(b, 1)] each: d_0 .. d_{b-1}."""
    draft_probs: list[torch.Tensor | None]
    """[1, max(b, 1) - 1, V] each for a row that verifies by residual sampling, else None."""
    processor_states: list[ProcessorState | None]
    """Each row's processor state after its prefill (None without processors)."""


class BatchState:
    """Every per-row array of the batch (see the module docstring)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.rows: list[Row] = []
        self.drafts: torch.Tensor | None = None
        """[B, max(b, 1)]: d_0 .. d_{b-1} of each row, on the device."""
        self.proposal_counts: torch.Tensor | None = None
        """[B]: how many of d_1.. are real proposals (the rest are padding, docs/design.md §3.4)."""
        self.draft_probs: torch.Tensor | None = None
        """[B, max(b, 1) - 1, V]: the distributions of d_1.. (None while no row is residual)."""
        self.sampling: SamplingBatch | None = None
        self.processor: LogitsProcessor | None = None
        """None while no row has penalties, min_tokens or bad words."""
        self.wants_log_probs = False
        """Whether any row asked for log probs."""

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ the three operations
    def add(self, new: NewRows, device: torch.device | str) -> None:
        """Join `new` rows at the end of the batch."""
        if not new.rows:
            return
        self.draft_probs = self._joined_probs(new.draft_probs, device)
        self.rows.extend(new.rows)
        known = [self.drafts] if self.drafts is not None and self.drafts.shape[0] else []
        self.drafts = torch.cat(known + new.drafts)
        counts = torch.tensor([row.proposal_count for row in new.rows], device=self.drafts.device)
        self.proposal_counts = torch.cat(([self.proposal_counts] if known else []) + [counts])
        self.processor = logits_processor.join(self.processor, new.processor_states, *self._processor_settings(),
                                               self.vocab_size, device)
        self._derive(device)

    def keep(self, order: Sequence[int]) -> None:
        """Keep only the rows `order` (old indices), in that order."""
        if not self.rows:
            return
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.clear()
            return
        device = self.drafts.device
        index = torch.tensor(list(order), dtype=torch.long, device=device)
        self.drafts, self.proposal_counts = self.drafts[index], self.proposal_counts[index]
        self.processor = logits_processor.keep(self.processor, order, *self._processor_settings())
        self._derive(device)
        if self.draft_probs is not None:
            self.draft_probs = self.draft_probs[index] if self.sampling.any_residual else None

    def resize(self, draft_len: int) -> None:
        """Cut the pending drafts to draft length b = `draft_len`, or pad them (a pad repeats the
        last draft; its distribution is a point mass; pad slots are never proposals: the counts
        are clamped to b - 1)."""
        width = max(draft_len, 1)
        for row in self.rows:
            row.proposal_count = min(row.proposal_count, width - 1)
            row.stats.widen(draft_len)
        if self.drafts is None:
            return
        self.proposal_counts = self.proposal_counts.clamp(max=width - 1)
        have = self.drafts.shape[1]
        if width <= have:
            self.drafts = self.drafts[:, :width]
            if self.draft_probs is not None:
                self.draft_probs = self.draft_probs[:, : width - 1]
            return
        pads = self.drafts[:, -1:].expand(-1, width - have)
        self.drafts = torch.cat([self.drafts, pads], dim=1)
        if self.draft_probs is not None:
            point_masses = torch.nn.functional.one_hot(pads, self.draft_probs.shape[-1]).float()
            self.draft_probs = torch.cat([self.draft_probs, point_masses], dim=1)

    def place_proposals(self, indices: Sequence[int], proposals: Sequence[Sequence[int]], pad_id: int) -> None:
        """Replace the pending proposals d_1.. of the rows `indices` by `proposals` (at most b - 1
        tokens each; the slots after them hold `pad_id`, padding), with point-mass distributions
        for rows that verify by residual sampling (docs/design.md §3.9). One host->device copy."""
        if not indices:
            return
        width = self.drafts.shape[1]
        device = self.drafts.device
        if any(len(tokens) > width - 1 for tokens in proposals):
            raise ValueError(f"a proposal is longer than the {width - 1} proposal slots of the drafts")
        host = [[row, len(tokens), *tokens, *[pad_id] * (width - 1 - len(tokens))]
                for row, tokens in zip(indices, proposals)]
        packed = torch.tensor(host, dtype=torch.long).to(device)
        index, tokens = packed[:, 0], packed[:, 2:].to(self.drafts.dtype)
        self.drafts[index, 1:] = tokens
        self.proposal_counts[index] = packed[:, 1].to(self.proposal_counts.dtype)
        for row, proposal in zip(indices, proposals):
            self.rows[row].proposal_count = len(proposal)
        if self.draft_probs is not None:
            self.draft_probs[index] = torch.nn.functional.one_hot(packed[:, 2:], self.draft_probs.shape[-1]).to(
                self.draft_probs.dtype)

    def clear(self) -> None:
        """No rows."""
        self.rows, self.drafts, self.proposal_counts, self.draft_probs = [], None, None, None
        self.sampling, self.processor, self.wants_log_probs = None, None, False

    # ------------------------------------------------------------------ derived state
    def _derive(self, device) -> None:
        """The state that follows from the rows' requests alone."""
        self.sampling = SamplingBatch.of([row.request.sampling for row in self.rows],
                                         [row.seed for row in self.rows], device)
        self.wants_log_probs = any(row.request.return_log_probs for row in self.rows)

    def _processor_settings(self) -> tuple[list[SamplingParams], list[frozenset[int]]]:
        return [row.request.sampling for row in self.rows], [row.eos_ids for row in self.rows]

    def _joined_probs(self, new: list[torch.Tensor | None], device) -> torch.Tensor | None:
        """The draft distributions of the rows there followed by those of `new` rows (zeros for
        rows that never read them); None while no row verifies by residual sampling."""
        if self.draft_probs is None and all(p is None for p in new):
            return None
        shape = next(p for p in [self.draft_probs, *new] if p is not None).shape[1:]
        zeros = lambda rows: torch.zeros((rows, *shape), device=device)  # noqa: E731
        known = self.draft_probs if self.draft_probs is not None else zeros(len(self.rows))
        return torch.cat([known, *(p if p is not None else zeros(1) for p in new)])

"""Repetition, presence and frequency penalties, min_tokens and bad words, batched on the device
(docs/design.md §3.7).

Semantics are TensorRT-LLM's, the owner of the serving contract (checked against
cpp/tensorrt_llm/kernels/penaltyKernels.cu `batchApplyPenalty` and banBadWords.cu `ban_bad_words`):
- the occurrence count c(v) of token v counts the whole sequence before the position: the prompt
  and the tokens generated so far; all three penalties read the same counts;
- order: logits / temperature, then for every v with c(v) > 0: repetition (x / r if x >= 0,
  x * r if x < 0), presence (x - p), frequency (x - f * c(v)); then min_tokens (the end ids
  get -inf while fewer than min_tokens tokens have been generated); then bad words (-inf); then
  top-k and top-p (runtime/sampling.py). Greedy rows are processed at temperature 1;
- a bad word w_1..w_m bans w_m at a position whose preceding tokens (prompt included) end with
  w_1..w_{m-1}; a one-token word is banned everywhere.

The state of each row lives on the device and is updated from the committed tokens of every
step without a host loop: the counts [B, V], the last MAX_BAD_WORD_TOKENS - 1 tokens of the
sequence (for bad words; -1 where the sequence is shorter) and the generated length [B].
Scores at n consecutive positions after the committed sequence are adjusted with `adjust`:
given the tokens assumed before each position (the drafts d_1..d_{i-1} when verifying
position i), the counts, the tail and the length at position i are those of the committed
sequence followed by those tokens, so a verified target equals AR decoding with the same
processors exactly, whatever the draft length. Drafts are adjusted with the committed state
alone (`adjust` without prior tokens): any draft is exact, drafts only need to be close.

A batch whose rows have no processor builds none (the engine keeps None and pays nothing);
rows without one in a batch that has some carry neutral settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling import MAX_BAD_WORD_TOKENS, SamplingParams

TAIL = MAX_BAD_WORD_TOKENS - 1
"""Recent tokens kept per row: the longest bad word's prefix."""


@dataclass
class ProcessorState:
    """The per-row state the processors read, on the device."""

    counts: torch.Tensor  # [B, V] float32: occurrences in prompt + committed output
    tail: torch.Tensor  # [B, TAIL] int64: the sequence's last tokens, -1 before its start
    generated: torch.Tensor  # [B] int64: tokens committed after the prompt

    @classmethod
    def of_prompt(cls, prompt: Sequence[int], vocab: int, device) -> "ProcessorState":
        ids = torch.tensor(list(prompt), dtype=torch.long, device=device)
        counts = torch.zeros(1, vocab, device=device).index_add_(1, ids, torch.ones(1, len(ids), device=device))
        tail = torch.full((1, TAIL), -1, dtype=torch.long, device=device)
        keep = min(TAIL, len(ids))
        if keep:
            tail[0, TAIL - keep:] = ids[len(ids) - keep:]
        return cls(counts, tail, torch.zeros(1, dtype=torch.long, device=device))

    @classmethod
    def neutral(cls, rows: int, vocab: int, device) -> "ProcessorState":
        """State of rows whose settings are neutral (it is never read)."""
        return cls(torch.zeros(rows, vocab, device=device), torch.full((rows, TAIL), -1, dtype=torch.long,
                                                                        device=device),
                   torch.zeros(rows, dtype=torch.long, device=device))

    @classmethod
    def cat(cls, states: Sequence["ProcessorState"]) -> "ProcessorState":
        return cls(*(torch.cat([getattr(s, name) for s in states]) for name in ("counts", "tail", "generated")))

    def select(self, index: torch.Tensor) -> "ProcessorState":
        return ProcessorState(self.counts[index], self.tail[index], self.generated[index])

    def commit(self, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Add each row's first counts[b] tokens of `tokens` [B, n] (the step's committed tokens)."""
        n = tokens.shape[1]
        valid = torch.arange(n, device=tokens.device) < counts[:, None]
        self.counts.scatter_add_(1, tokens, valid.float())
        # the new tail: the last TAIL tokens of (old tail, the valid tokens)
        joined = torch.cat([self.tail, tokens], dim=1)
        self.tail = joined.gather(1, counts[:, None] + torch.arange(TAIL, device=tokens.device))
        self.generated = self.generated + counts


class LogitsProcessor:
    """The processors of a batch of rows: settings (rebuilt on the host when rows join or leave)
    and the device state, with host flags that skip the unused parts."""

    def __init__(self, params: Sequence[SamplingParams], eos_ids: Sequence[frozenset[int]], state: ProcessorState,
                 vocab: int):
        device = state.counts.device
        self.state, self.vocab = state, vocab
        self.penalized = any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                             for p in params)
        self.repetition = torch.tensor([float(p.repetition_penalty) for p in params], device=device)
        self.presence = torch.tensor([float(p.presence_penalty) for p in params], device=device)
        self.frequency = torch.tensor([float(p.frequency_penalty) for p in params], device=device)
        self.min_tokens = torch.tensor([p.min_tokens for p in params], dtype=torch.long, device=device)
        self.has_min_tokens = any(p.min_tokens > 0 and eos for p, eos in zip(params, eos_ids))
        self.eos = None
        if self.has_min_tokens:
            eos = torch.zeros(len(params), vocab, dtype=torch.bool)
            for row, ids in enumerate(eos_ids):
                eos[row, sorted(ids)] = True
            self.eos = eos.to(device)
        # bad words, one entry per (row, word): the prefix right-aligned in TAIL slots
        words = [(row, word) for row, p in enumerate(params) for word in p.bad_words]
        self.has_bad_words = bool(words)
        if self.has_bad_words:
            self.word_width = max(len(word) - 1 for _, word in words)  # prefix slots actually used
            prefix = torch.full((len(words), self.word_width), -1, dtype=torch.long)
            used = torch.zeros(len(words), self.word_width, dtype=torch.bool)
            for index, (_, word) in enumerate(words):
                if len(word) > 1:
                    prefix[index, self.word_width - len(word) + 1:] = torch.tensor(word[:-1])
                    used[index, self.word_width - len(word) + 1:] = True
            self.word_row = torch.tensor([row for row, _ in words], dtype=torch.long, device=device)
            self.word_token = torch.tensor([word[-1] for _, word in words], dtype=torch.long, device=device)
            self.word_prefix, self.word_used = prefix.to(device), used.to(device)

    def adjust(self, scores: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Processed scores for n consecutive positions after each row's committed sequence:
        `scores` [B, n, V] are temperature-scaled logits; `prior` [B, n - 1] are the tokens assumed
        at the first n - 1 of these positions (None: the committed state for every position, the
        drafts' approximation; the generated length still advances by one per position)."""
        batch, n, vocab = scores.shape
        if n == 0:
            return scores
        device = scores.device
        offsets = torch.arange(n, device=device)
        assumed = prior is not None and n > 1
        if self.penalized:
            counts = self.state.counts[:, None, :].expand(batch, n, vocab)
            if assumed:  # position i also counts prior[:, :i]
                earlier = torch.zeros(batch, n, vocab, device=device)
                earlier[:, 1:].scatter_(2, prior[:, :, None], 1.0)
                counts = counts + earlier.cumsum(1)
            seen = counts > 0
            repetition = self.repetition[:, None, None]
            scores = torch.where(seen, torch.where(scores < 0, scores * repetition, scores / repetition), scores)
            scores = scores - seen.float() * self.presence[:, None, None] - counts * self.frequency[:, None, None]
        if self.has_min_tokens:
            early = (self.state.generated[:, None] + offsets) < self.min_tokens[:, None]  # [B, n]
            scores = scores.masked_fill(early[:, :, None] & self.eos[:, None, :], float("-inf"))
        if self.has_bad_words:
            scores = self._ban_words(scores, prior if assumed else None)
        return scores

    def _ban_words(self, scores: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        batch, n, vocab = scores.shape
        width = self.word_width
        tail = self.state.tail[:, TAIL - width:] if width else self.state.tail[:, :0]
        if prior is not None:
            sequence = torch.cat([tail, prior], dim=1)  # [B, width + n - 1]
            windows = sequence.unfold(1, width, 1) if width else sequence.new_zeros(batch, n, 0)  # [B, n, width]
        else:
            windows = tail[:, None, :].expand(batch, n, width)
        mine = windows[self.word_row]  # [W, n, width]
        match = ((mine == self.word_prefix[:, None, :]) | ~self.word_used[:, None, :]).all(-1)  # [W, n]
        flat = (self.word_row[:, None] * n + torch.arange(n, device=scores.device)) * vocab + self.word_token[:, None]
        ban = torch.where(match, float("-inf"), 0.0).reshape(-1)  # adding -inf bans; 0 leaves the score
        return scores.reshape(-1).index_put((flat.reshape(-1),), ban, accumulate=True).view(batch, n, vocab)


def join(processor: LogitsProcessor | None, joining: Sequence[ProcessorState | None],
         params: Sequence[SamplingParams], eos_ids: Sequence[frozenset[int]], vocab: int,
         device) -> LogitsProcessor | None:
    """The processor after rows join a batch (None while no row has a processor): `joining` holds
    each new row's state after its prefill (None for a row without processors); `params` and
    `eos_ids` are the settings of every row, those already there first."""
    if processor is None and all(state is None for state in joining):
        return None
    before = len(params) - len(joining)
    states = [processor.state if processor is not None else ProcessorState.neutral(before, vocab, device)]
    states += [state if state is not None else ProcessorState.neutral(1, vocab, device) for state in joining]
    return LogitsProcessor(params, eos_ids, ProcessorState.cat(states), vocab)


def keep(processor: LogitsProcessor | None, order: Sequence[int], params: Sequence[SamplingParams],
         eos_ids: Sequence[frozenset[int]]) -> LogitsProcessor | None:
    """The processor of the rows left, in `order` (old indices); None once no row has one."""
    if processor is None or not any(p.processes_logits for p in params):
        return None
    index = torch.tensor(list(order), dtype=torch.long, device=processor.state.counts.device)
    return LogitsProcessor(params, eos_ids, processor.state.select(index), processor.vocab)

"""The TiDAR draft-verify loop (docs/design.md §3), for batches of independent requests.

One readable function per phase:
  prefill  the prompt (causal) plus a block of b masks; d_0 = the target choice at the prompt's
           end, d_1..d_{b-1} = the masks' diffusion choices.
  step     one forward over b drafts and k <= b blocks of b masks (k = b: the paper's step);
           verify the proposals against the target logits; commit a tokens; the next d_0 is the
           correction or bonus token and the next proposals come from block a, or from block
           k's masks after the new d_0 when a > k (fewer proposals; docs/design.md §3.4).
Draft length 0 is plain AR decoding through the same code (one causal token per step), the
baseline every TiDAR figure is compared with.

Target logits for position L+i mix AR and diffusion: beta * AR_i + (1 - beta) * diff_i, where
AR_i is the output at the token before (d_{i-1}) and diff_i the output of the first mask of
block i (same position). beta = 1, the default, is lossless: greedy output equals AR greedy
output, and sampled output is distributed as AR sampling (exact speculative sampling).

Every token is picked by one rule (sampling.py): the argmax of the processed logits plus
Gumbel noise keyed by (seed, absolute position, token) for sampled rows, the plain argmax for
greedy rows. Drafts use the same rule on the diffusion logits at their own positions. Greedy
and seeded rows verify by comparing each draft with the target's choice at its position, so a
seeded row's output is a function of (model, prompt, sampling settings, seed): the same for any
draft length, batch or backend. Unseeded sampled rows verify by residual speculative sampling,
which accepts more (docs/design.md §3.5).

A step is batched over rows on the device: the drafts [B, b], the target's choices, the
accepted counts, the next drafts and the cache commit are tensors, and the step reads the
device once (the committed tokens and counts, `_read`). Per-row Python runs only on the host
side of that one transfer (statistics, stop conditions, text).

Rows are independent: each has its own cached length, sampling settings, seed, stop
conditions and statistics; finished rows leave the batch, new rows may join between steps
(`add`), rows may be ended early (`finish`: cancellation, timeout) and the draft length may
change between steps (`set_draft_len`, with the number of blocks k: the draft shape), which is
how a server adapts it to the batch. The KV
cache is allocated once (`max_rows` x `max_len` when given) and rows take and return slots.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .backends.base import Backend, StepLogits
from .cache import KVCache
from . import logits_processor
from .layout import Layout, check_draft_shape, next_proposals
from .logits_processor import LogitsProcessor, ProcessorState
from .sampling import SamplingBatch, SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer


class RequestError(ValueError):
    """A request that cannot be served; the message names the field."""


@dataclass
class Request:
    """One generation request."""

    prompt_ids: Sequence[int]
    """Token ids of the prompt (at least one)."""
    max_new_tokens: int = 64
    """Upper bound on generated tokens."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Greedy by default."""
    stop: Sequence[str] = ()
    """Stop strings: output ends before the first one (the text excludes it)."""
    eos_ids: Sequence[int] | None = None
    """End ids (None: the model's eos ids; empty: never stop on a token)."""
    request_id: object = None
    """Caller's handle, echoed in deltas and results."""
    return_log_probs: bool = False
    """Report each token's log-probability (`SamplingBatch.choose_with_log_probs`) in deltas and results."""


def add_per_position(totals: list[int], increments: Sequence[int]) -> None:
    """Add `increments` to `totals` position by position, extending `totals` with zeros first when
    it is shorter (the draft length, hence the number of proposal positions, may change)."""
    totals.extend([0] * (len(increments) - len(totals)))
    for position, count in enumerate(increments):
        totals[position] += count


@dataclass(frozen=True)
class StepStats:
    """What one forward added to one request's counters (`Stats.add` sums them). A value of its
    own in every delta: nothing in it changes after the delta is made."""

    forward_passes: int = 0
    """1 for a prefill or a step; 0 for a delta that no forward made (`DecodeEngine.finish`)."""
    drafts: int = 0
    """1 when this step verified proposals."""
    draft_tokens: int = 0
    """Proposals verified in this step (b - 1; fewer after a step that committed more than k
    tokens with k < b blocks: a padded draft slot is never a proposal and never accepted)."""
    accepted_tokens: int = 0
    """Proposals accepted in this step."""
    accepted_per_position: tuple[int, ...] = ()
    """1 at each proposal position d_1..d_{b-1} accepted in this step, else 0 (empty without proposals)."""
    proposed_per_position: tuple[int, ...] = ()
    """1 at each position d_1..d_{b-1} that held a proposal in this step, else 0."""
    prefill_seconds: float = 0.0
    """The prefill's wall time (on the request's first delta only)."""


@dataclass
class Stats:
    """Per-request counters, in the style of vLLM's speculative-decoding metrics: the sums of
    the request's `StepStats`, plus its decode time."""

    forward_passes: int = 0
    """Forwards this request took part in (prefill included)."""
    drafts: int = 0
    """Steps that verified proposals."""
    draft_tokens: int = 0
    """Proposals verified (b - 1 per step with k = b blocks; see `StepStats.draft_tokens`)."""
    accepted_tokens: int = 0
    """Proposals accepted."""
    accepted_per_position: list[int] = field(default_factory=list)
    """accepted_per_position[i]: how often proposal d_{i+1} was accepted."""
    proposed_per_position: list[int] = field(default_factory=list)
    """proposed_per_position[i]: how often there was a proposal d_{i+1} to verify."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    """Wall time from the end of the prefill to the request's end (set when it finishes)."""

    def add(self, step: StepStats) -> None:
        """Count one forward's increments."""
        self.forward_passes += step.forward_passes
        self.drafts += step.drafts
        self.draft_tokens += step.draft_tokens
        self.accepted_tokens += step.accepted_tokens
        add_per_position(self.accepted_per_position, step.accepted_per_position)
        add_per_position(self.proposed_per_position, step.proposed_per_position)
        self.prefill_seconds += step.prefill_seconds

    def copy(self) -> Stats:
        return dataclasses.replace(self, accepted_per_position=list(self.accepted_per_position),
                                   proposed_per_position=list(self.proposed_per_position))


@dataclass
class Result:
    """One request's outcome: its whole output, counter totals and timings (carried by its final
    delta; `DecodeEngine.generate` returns them)."""

    request_id: object
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: Stats
    draft_len: int
    seconds: float
    request: Request = field(repr=False, compare=False, default=None)
    log_probs: list[float] | None = None
    """One per token of `token_ids` when the request asked for them."""
    draft_blocks: int | None = None
    """k, the mask blocks of the steps (the last shape used; = draft_len unless set)."""

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.stats.forward_passes, 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Delta:
    """What one forward added to one request (the unit of streaming). Every delta is a value of
    its own: no later step changes it, and it shares no mutable state with the engine."""

    request_id: object
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    step_stats: StepStats = field(default_factory=StepStats)
    """This forward's increments to the request's counters (`Stats.add` sums them)."""
    log_probs: list[float] | None = None
    """One per token of `token_ids` when the request asked for them."""
    result: Result | None = field(default=None, repr=False)
    """On the final delta of a request the engine ran: the request's `Result` (totals, timings)."""
    admission: int | None = None
    """The engine's number for the request, distinct for every request one engine admits (in
    `add` order); None on deltas made outside an engine."""


@dataclass
class _Row:
    request: Request
    prompt_ids: list[int]
    eos_ids: frozenset[int]
    seed: int  # the request's seed, or one drawn at admission (sampled rows)
    stats: Stats
    detokenizer: IncrementalDetokenizer | None
    started: float
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    admission: int = -1  # set by `add`
    proposals: int = 0  # real proposals among the pending drafts d_1..; host copy of DecodeEngine._proposals


class DecodeEngine:
    """Runs requests through prefill and draft-verify steps on one backend."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None = None, draft_len: int | None = None,
                 beta: float = 1.0, max_rows: int | None = None, max_len: int | None = None,
                 draft_blocks: int | None = None):
        """`max_rows` x `max_len` sizes the KV cache once (slots per row: prompt + new tokens
        + one step's new tokens); without them the cache is sized by the first requests and
        grows (doubling) when a later one does not fit. `draft_blocks` k: mask blocks per step
        (1..b; None: k = b)."""
        config = backend.config
        self.backend, self.config, self.tokenizer = backend, config, tokenizer
        if draft_len is None:
            draft_len = config.block_size
        draft_blocks = self.check_draft_len(draft_len, draft_blocks)
        if not 0.0 <= beta <= 1.0:
            raise RequestError(f"beta must be in [0, 1], got {beta!r}")
        for name, value in (("max_rows", max_rows), ("max_len", max_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        self.draft_len, self.draft_blocks, self.beta = draft_len, draft_blocks, beta
        self.max_rows, self.max_len = max_rows, max_len
        self.layout = Layout.decode(draft_len, draft_blocks)
        self._proposals: torch.Tensor | None = None  # [B]: how many of d_1.. are real proposals (the rest pad)
        self.cache: KVCache | None = None
        self.rows: list[_Row] = []
        self._drafts: torch.Tensor | None = None  # [B, max(b, 1)]: d_0 .. d_{b-1} of each row, on the device
        self._draft_probs: torch.Tensor | None = None  # [B, max(b, 1) - 1, V]: q of d_1.. (while a row is residual)
        self._sampling: SamplingBatch | None = None
        self._processor: LogitsProcessor | None = None  # None while no row has penalties, min_tokens or bad words
        self._log_probs = False  # whether any row asked for log probs
        self._admissions = itertools.count()  # numbers of admitted requests (`Delta.admission`)

    @property
    def batch_size(self) -> int:
        """Rows in the batch now."""
        return len(self.rows)

    def request_ids(self) -> list[object]:
        """The request ids of the rows in the batch, in row order."""
        return [row.request.request_id for row in self.rows]

    def check_draft_len(self, draft_len: int, draft_blocks: int | None = None) -> int:
        """Raise RequestError unless `draft_len` b is usable by this model (0 .. block_size) and
        `draft_blocks` k with it (1 .. b, or None for b); returns k."""
        block = self.config.block_size
        if isinstance(draft_len, bool) or not isinstance(draft_len, int) or not 0 <= draft_len <= block:
            raise RequestError(f"draft_len must be an integer in [0, block_size={block}] "
                               f"(0 = AR decoding), got {draft_len!r}")
        try:
            return check_draft_shape(draft_len, draft_blocks)
        except ValueError as error:
            raise RequestError(str(error)) from None

    # ------------------------------------------------------------------ admission
    def check(self, request: Request) -> None:
        """Raise RequestError naming the problem if `request` cannot be served."""
        prompt = list(request.prompt_ids)
        vocab = self.config.vocab_size
        if not prompt:
            raise RequestError("prompt is empty: at least one token is needed")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if self.config.mask_token_id in prompt:
            raise RequestError(f"prompt contains the mask token id {self.config.mask_token_id}")
        if isinstance(request.max_new_tokens, bool) or not isinstance(request.max_new_tokens, int) \
                or request.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be a positive integer, got {request.max_new_tokens!r}")
        limit = self.config.max_position_embeddings
        if len(prompt) >= limit:
            raise RequestError(f"prompt of {len(prompt)} tokens is too long: it must be shorter than "
                               f"max_position_embeddings = {limit}, leaving room for a new token")
        if not isinstance(request.sampling, SamplingParams):
            raise RequestError(f"sampling must be SamplingParams, got {type(request.sampling).__name__}")
        if isinstance(request.stop, str) or any(not isinstance(s, str) or not s for s in request.stop):
            raise RequestError(f"stop must be a list of non-empty strings, got {request.stop!r}")
        if request.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer")
        eos = request.eos_ids if request.eos_ids is not None else ()
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in eos):
            raise RequestError(f"eos_ids {list(eos)!r} must be token ids in [0, {vocab})")
        for word in request.sampling.bad_words:
            if any(t >= vocab for t in word):
                raise RequestError(f"bad_words entry {list(word)!r} holds a token id outside the vocabulary "
                                   f"[0, {vocab})")

    def _capacity(self, request: Request) -> int:
        """Slots a row of `request` may use: any draft length fits without growing the cache."""
        return len(request.prompt_ids) + request.max_new_tokens + Layout.decode(self.config.block_size).num_new

    def _reserve(self, requests: Sequence[Request]) -> None:
        """Make room for `requests` next to the active rows: the cache is made once, sized by
        `max_rows` / `max_len` when given, and grows (doubling) only when they were not."""
        rows = len(self.rows) + len(requests)
        slots = max(self._capacity(r) for r in requests)
        if self.max_rows is not None and rows > self.max_rows:
            raise RequestError(f"{rows} rows exceed max_rows = {self.max_rows}")
        if self.max_len is not None and slots > self.max_len:
            raise RequestError(f"a request needs {slots} KV slots (prompt + max_new_tokens + one step), more than "
                               f"max_len = {self.max_len}")
        if self.cache is None:
            self.cache = self.backend.new_cache(self.max_rows or rows, self.max_len or slots)
            self.cache.clear()
        elif rows > self.cache.max_rows or slots > self.cache.capacity:
            grow = lambda need, have: have if need <= have else max(need, 2 * have)  # noqa: E731
            self.cache.grow(grow(rows, self.cache.max_rows), grow(slots, self.cache.capacity))

    def add(self, requests: Sequence[Request]) -> list[Delta]:
        """Validate and prefill `requests`, join them to the batch; return their first deltas.
        Nothing is added unless every request is valid."""
        for request in requests:
            self.check(request)
        if not requests:
            return []
        self._reserve(requests)
        indices = self.cache.add_rows(len(requests))
        rows, drafts, probs, states, firsts, prefills = [], [], [], [], [], []
        for index, request in zip(indices, requests):
            row, row_drafts, row_probs, state, first = self._prefill(request, self.cache.row(index))
            row.admission = next(self._admissions)
            prefills.append(StepStats(forward_passes=1, prefill_seconds=time.perf_counter() - row.started))
            rows.append(row)
            drafts.append(row_drafts)
            probs.append(row_probs)
            states.append(state)
            firsts.append(first)
        self._draft_probs = self._join_probs(len(self.rows), probs)
        self.rows.extend(rows)
        known = [self._drafts] if self._drafts is not None and self._drafts.shape[0] else []
        self._drafts = torch.cat(known + drafts)
        counts = torch.tensor([row.proposals for row in rows], device=self._drafts.device)
        self._proposals = torch.cat(([self._proposals] if known else []) + [counts])
        self._sampling = self._sampling_batch()
        self._processor = logits_processor.join(self._processor, states, *self._processor_settings(),
                                                self.config.vocab_size, self.cache.device)
        self._log_probs = any(row.request.return_log_probs for row in self.rows)
        # the first tokens and their log probs: one device->host transfer
        firsts = torch.cat(firsts).tolist()
        deltas = [self._emit(row, prefill, [int(first[0])], first[1:])
                  for row, prefill, first in zip(rows, prefills, firsts)]
        self._drop_finished()
        return deltas

    def _join_probs(self, known_rows: int, new: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The draft distributions of the `known_rows` active rows followed by those of new rows
        (zeros for rows that never read them); None while no row verifies by residual sampling."""
        if self._draft_probs is None and all(p is None for p in new):
            return None
        shape = next(p for p in [self._draft_probs, *new] if p is not None).shape[1:]
        zeros = lambda rows: torch.zeros((rows, *shape), device=self.cache.device)  # noqa: E731
        known = self._draft_probs if self._draft_probs is not None else zeros(known_rows)
        return torch.cat([known, *(p if p is not None else zeros(1) for p in new)])

    def _sampling_batch(self) -> SamplingBatch:
        return SamplingBatch.of([row.request.sampling for row in self.rows], [row.seed for row in self.rows],
                                self.cache.device)

    def _processor_settings(self) -> tuple[list[SamplingParams], list[frozenset[int]]]:
        return [row.request.sampling for row in self.rows], [row.eos_ids for row in self.rows]

    def set_draft_len(self, draft_len: int, draft_blocks: int | None = None) -> None:
        """Use the draft shape (b, k) = (`draft_len`, `draft_blocks`; None: k = b) from the next step
        on. Rows keep their output; their pending proposals are cut to the new length, or padded
        (pad slots are not proposals: never verified, never counted; docs/design.md §3.4)."""
        draft_blocks = self.check_draft_len(draft_len, draft_blocks)
        if (draft_len, draft_blocks) == (self.draft_len, self.draft_blocks):
            return
        self.draft_blocks, self.layout = draft_blocks, Layout.decode(draft_len, draft_blocks)
        if draft_len == self.draft_len:
            return
        self.draft_len = draft_len
        for row in self.rows:
            row.proposals = min(row.proposals, max(draft_len - 1, 0))
            for positions in (row.stats.accepted_per_position, row.stats.proposed_per_position):
                positions.extend([0] * (draft_len - 1 - len(positions)))
        if self._drafts is not None:
            self._proposals = self._proposals.clamp(max=max(draft_len - 1, 0))
            wanted, have = max(draft_len, 1), self._drafts.shape[1]
            if wanted <= have:
                self._drafts = self._drafts[:, :wanted]
                if self._draft_probs is not None:
                    self._draft_probs = self._draft_probs[:, : wanted - 1]
            else:
                pads = self._drafts[:, -1:].expand(-1, wanted - have)
                self._drafts = torch.cat([self._drafts, pads], dim=1)
                if self._draft_probs is not None:
                    point_masses = torch.nn.functional.one_hot(pads, self._draft_probs.shape[-1]).float()
                    self._draft_probs = torch.cat([self._draft_probs, point_masses], dim=1)

    def finish(self, request_ids: Sequence[object], reason: str) -> list[Delta]:
        """End the rows of `request_ids` now with finish reason `reason` (e.g. "cancelled",
        "timeout"); their cache rows are freed. Returns the final delta of each (the text held
        back for stop strings, flushed; the `Result`)."""
        wanted = set(request_ids)
        deltas = []
        for row in self.rows:
            if row.request.request_id in wanted and row.finish_reason is None:
                row.finish_reason = reason
                row.stats.decode_seconds = time.perf_counter() - row.started - row.stats.prefill_seconds
                text = ""
                if row.detokenizer is not None:
                    row.detokenizer.flush()
                    row.text = row.detokenizer.text
                    text = row.detokenizer.delta(final=True)
                deltas.append(Delta(row.request.request_id, [], text, True, reason, result=self._result(row),
                                    admission=row.admission))
        self._drop_finished()
        return deltas

    def reset(self) -> None:
        """Drop every row without a result (after an internal error); the cache is made anew."""
        self.rows, self.cache, self._drafts, self._draft_probs, self._sampling = [], None, None, None, None
        self._proposals = None
        self._processor, self._log_probs = None, False

    # ------------------------------------------------------------------ phases
    def _prefill(self, request: Request, cache: KVCache) -> tuple[_Row, torch.Tensor, torch.Tensor | None,
                                                                  ProcessorState | None, torch.Tensor]:
        """Prefill one request into its cache row. Returns the row, its drafts [1, max(b, 1)], the
        distributions of d_1.. for a residual row ([1, max(b, 1) - 1, V], else None), its
        processor state with d_0 committed (None without processors) and [d_0, log prob of d_0]
        (float64 [1, 2]; the log prob is 0 unless the request asked for it)."""
        started = time.perf_counter()
        b = self.draft_len
        prompt = list(request.prompt_ids)
        layout = Layout.prefill(len(prompt), b)
        tokens = torch.tensor([prompt + [self.config.mask_token_id] * b], device=cache.device)
        out = StepLogits(self.backend, tokens, layout, cache)
        cache.commit([len(prompt)])
        params = request.sampling
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        eos = request.eos_ids if request.eos_ids is not None else self.config.eos_token_ids
        row = _Row(request=request, prompt_ids=prompt, eos_ids=frozenset(eos), seed=seed,
                   stats=Stats(accepted_per_position=[0] * max(b - 1, 0), proposed_per_position=[0] * max(b - 1, 0)),
                   detokenizer=IncrementalDetokenizer(self.tokenizer, request.stop) if self.tokenizer else None,
                   started=started, proposals=max(b - 1, 0))
        sampling = SamplingBatch.of([params], [seed], cache.device)
        processor = state = None
        if params.processes_logits:
            state = ProcessorState.of_prompt(prompt, self.config.vocab_size, cache.device)
            processor = LogitsProcessor([params], [row.eos_ids], state, self.config.vocab_size)
        adjust = processor.adjust if processor is not None else None
        # d_0 at position L: AR at the last prompt token, mixed with mask 0 (same position);
        # d_1..d_{b-1} at positions L+1..: the block's masks 1..b-1. The LM head runs on these rows only.
        L = len(prompt)
        positions = torch.arange(L, L + max(b, 1), device=cache.device)[None]
        mixed = b and self.beta < 1.0
        logits = out.rows(torch.cat([positions[:, :1] - 1, positions[:, : 1 if mixed else 0], positions[:, 1:]], 1))
        target = self._mix(logits[:, :1], logits[:, 1:2] if mixed else None)
        if request.return_log_probs:
            first, log_prob = sampling.choose_with_log_probs(target, positions[:, :1], adjust)
            reported = torch.cat([first.double(), log_prob.double()], dim=1)
        else:
            first = sampling.choose(target, positions[:, :1], adjust)
            reported = torch.cat([first.double(), torch.zeros_like(first, dtype=torch.float64)], dim=1)
        if state is not None:
            state.commit(first, torch.ones(1, dtype=torch.long, device=cache.device))
        proposals, probs = sampling.draft(logits[:, 1 + mixed:], positions[:, 1:], adjust)
        drafts = torch.cat([first, proposals], dim=1)
        return row, drafts, probs, state, reported

    def step(self) -> list[Delta]:
        """One forward for every active row; returns one delta per row."""
        if not self.rows:
            return []
        committed, tokens, log_probs = self._read(*self._device_step())
        deltas = []
        b, k = self.draft_len, self.draft_blocks
        for row, count, new_tokens, new_log_probs in zip(self.rows, committed, tokens, log_probs):
            step = StepStats(forward_passes=1)
            if row.proposals:
                accepted, proposed = count - 1, row.proposals
                step = StepStats(forward_passes=1, drafts=1, draft_tokens=proposed, accepted_tokens=accepted,
                                 accepted_per_position=(1,) * accepted + (0,) * (b - 1 - accepted),
                                 proposed_per_position=(1,) * proposed + (0,) * (b - 1 - proposed))
            row.proposals = max(next_proposals(count - 1, b, k)[2], 0)
            deltas.append(self._emit(row, step, new_tokens[:count], new_log_probs[:count]))
        self._drop_finished()
        return deltas

    def _device_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, verification and next drafts for all rows, on the device. Returns the packed
        output [B, 1 + max(b, 1)] (each row's committed count, then its tokens; entries past the
        count are padding), followed by the tokens' log probs (float64 [B, 1 + 2 max(b, 1)]) when
        a row asked for them, and the counts [B] for the cache commit."""
        b, layout, cache = self.draft_len, self.layout, self.cache
        nb = max(b, 1)
        batch, device = len(self.rows), self._drafts.device
        masks = torch.full((batch, layout.num_new - layout.causal_len), self.config.mask_token_id, device=device)
        past = cache.lengths.clone()  # position of each row's d_0
        out = StepLogits(self.backend, torch.cat([self._drafts, masks], dim=1), layout, cache)
        # Target at positions past+1 .. past+b: AR output at d_{i-1} (rows 0..b-1), mixed when
        # beta < 1 with the mask at the same position of block i (mask 0), or of the last block
        # when i > k. The LM head runs on these rows, then on b - 1 more.
        offsets = torch.arange(1, nb + 1, device=device)
        rows = offsets - 1
        mixed = b and self.beta < 1.0
        if mixed:
            mixing_block = rows.clamp(max=self.draft_blocks - 1)
            rows = torch.cat([rows, layout.causal_len + b * mixing_block + rows - mixing_block])
        logits = out.rows(rows[None].expand(batch, -1))
        target = self._mix(logits[:, :nb], logits[:, nb:] if mixed else None)
        # the target at d_i's position assumes d_1..d_{i-1} accepted: with processors, they count
        processor = self._processor
        adjust = (lambda scores: processor.adjust(scores, self._drafts[:, 1:nb])) if processor is not None else None
        # proposals past a row's count (k < b, §3.4) are padding: never accepted
        accepted, next_token, scores = self._sampling.verify(self._drafts[:, 1:], self._draft_probs, target,
                                                             past[:, None] + offsets, adjust,
                                                             counts=self._proposals if b > 1 else None)
        committed = accepted + 1
        # Emitted tokens: d_1..d_accepted, then the correction or bonus token.
        shifted = torch.cat([self._drafts[:, 1:], next_token[:, None]], dim=1)
        emitted = torch.where(torch.arange(nb, device=device) < accepted[:, None], shifted, next_token[:, None])
        if processor is not None:
            processor.state.commit(emitted, committed)
        if self._log_probs:
            log_probs = (self._sampling.log_probs(scores, emitted) if scores is not None
                         else torch.zeros(emitted.shape, device=device))
        # Next drafts at positions past + committed + 1 .. (processed with the committed state,
        # which holds the new d_0): block `accepted` (it sees d_0..d_accepted), masks 1..b-1; when
        # accepted >= k, block k-1's masks after the new d_0, fewer of them (docs/design.md §3.4):
        # the slots past `count` are padding.
        drafts = next_token[:, None]
        if b > 1:
            block, first_mask, count = next_proposals(accepted, b, self.draft_blocks)
            slot = offsets[None, : b - 1] - 1
            masks_used = (first_mask[:, None] + slot).clamp(max=b - 1)
            mask_logits = out.rows(layout.causal_len + block[:, None] * b + masks_used)
            proposals, probs = self._sampling.draft(mask_logits, past[:, None] + committed[:, None] + 1 + slot,
                                                    processor.adjust if processor is not None else None)
            proposals = torch.where(slot < count[:, None], proposals, self.config.mask_token_id)
            drafts = torch.cat([drafts, proposals], dim=1)
            self._proposals = count
            if probs is not None:
                self._draft_probs = probs
        self._drafts = drafts
        if self._log_probs:
            return torch.cat([committed[:, None].double(), emitted.double(), log_probs.double()], dim=1), committed
        return torch.cat([committed[:, None], emitted], dim=1), committed

    def _read(self, packed: torch.Tensor, counts: torch.Tensor) -> tuple[list[int], list[list[int]], list[list[float]]]:
        """The step's one device->host transfer; then the cache commit (the device adds `counts`,
        the host its copy of them). Returns the committed counts, tokens and log probs (empty
        lists unless they were packed)."""
        host = packed.tolist()
        width = max(self.draft_len, 1)
        committed = [int(row[0]) for row in host]
        self.cache.commit(counts, committed)
        return committed, [[int(t) for t in row[1:1 + width]] for row in host], [row[1 + width:] for row in host]

    def _mix(self, ar_logits: torch.Tensor, diff_logits: torch.Tensor | None) -> torch.Tensor:
        if diff_logits is None or self.beta == 1.0:
            return ar_logits
        return self.beta * ar_logits.float() + (1.0 - self.beta) * diff_logits.float()

    # ------------------------------------------------------------------ output
    def _emit(self, row: _Row, step: StepStats, new_tokens: list[int], new_log_probs: list[float] = ()) -> Delta:
        """Count the forward's `step` increments, append committed tokens (and their log probs
        when the request asked for them) to `row`, apply the stop conditions, return the delta
        (with the `Result` when the row finished). The text grows token by token (no re-decoding
        of the output)."""
        request = row.request
        row.stats.add(step)
        before = len(row.tokens)
        limit = self.config.max_position_embeddings
        cut = False
        for index, token in enumerate(new_tokens):
            row.tokens.append(token)
            if request.return_log_probs:
                row.log_probs.append(new_log_probs[index])
            if row.detokenizer is not None and row.detokenizer.add(token):
                row.finish_reason, cut = "stop", True  # a stop string: the text ends before it
                break
            if token in row.eos_ids:
                row.finish_reason = "stop"
                break
            if len(row.tokens) >= request.max_new_tokens or len(row.prompt_ids) + len(row.tokens) >= limit:
                row.finish_reason = "length"
                break
        if row.detokenizer is not None:
            if row.finish_reason is not None and not cut and row.detokenizer.flush():
                row.finish_reason = "stop"
            row.text = row.detokenizer.text
        finished = row.finish_reason is not None
        if finished:
            row.stats.decode_seconds = time.perf_counter() - row.started - row.stats.prefill_seconds
        text = row.detokenizer.delta(final=finished) if row.detokenizer else ""
        return Delta(request.request_id, row.tokens[before:], text, finished, row.finish_reason, step,
                     row.log_probs[before:] if request.return_log_probs else None,
                     self._result(row) if finished else None, row.admission)

    def _drop_finished(self) -> None:
        gone = [i for i, row in enumerate(self.rows) if row.finish_reason is not None]
        if not gone:
            return
        order = self.cache.remove_rows(gone)  # the last rows fill the holes
        self.rows = [self.rows[i] for i in order]
        keep = torch.tensor(order, dtype=torch.long, device=self._drafts.device)
        self._drafts, self._proposals = self._drafts[keep], self._proposals[keep]
        self._sampling = self._sampling_batch() if self.rows else None
        if self._draft_probs is not None:
            self._draft_probs = self._draft_probs[keep] if self._sampling and self._sampling.any_residual else None
        self._processor = logits_processor.keep(self._processor, order, *self._processor_settings())
        self._log_probs = any(row.request.return_log_probs for row in self.rows)

    def _result(self, row: _Row) -> Result:
        """The finished `row`'s result: copies, so that it shares nothing with the engine."""
        return Result(row.request.request_id, list(row.prompt_ids), list(row.tokens), row.text, row.finish_reason,
                      row.stats.copy(), self.draft_len, time.perf_counter() - row.started, row.request,
                      list(row.log_probs) if row.request.return_log_probs else None, self.draft_blocks)

    # ------------------------------------------------------------------ drivers
    def stream(self, requests: Sequence[Request]) -> Iterator[list[Delta]]:
        """Run `requests` as one batch; yield the deltas of every forward as they come."""
        yield self.add(requests)
        while self.rows:
            yield self.step()

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run `requests` to completion as one batch; results in request order (the results of
        rows that were in the batch before are dropped)."""
        stream = self.stream(requests)
        first = next(stream)  # the requests' first deltas, in request order
        order = {delta.admission: index for index, delta in enumerate(first)}
        results: list[Result | None] = [None] * len(requests)
        for deltas in itertools.chain([first], stream):
            for delta in deltas:
                if delta.result is not None and delta.admission in order:
                    results[order[delta.admission]] = delta.result
        return results

"""The TiDAR draft-verify loop (docs/design.md §3), for batches of independent requests.

A request goes through two phases:
  prefill  the prompt (causal) plus a block of b masks; d_0 = the target choice at the prompt's
           end, d_1..d_{b-1} = the masks' diffusion choices (`_prefill`).
  step     one forward over b drafts and k <= b blocks of b masks (k = b: the paper's step), in
           four functions read top to bottom in `step`: `_forward` runs the model, `_verify`
           checks the proposals against the target logits, `_commit` keeps the accepted
           proposals and the correction or bonus token, `_draft` picks the next proposals from
           block a, or from block k's masks after the new d_0 when a > k (fewer proposals;
           docs/design.md §3.4).
Draft length 0 is plain AR decoding through the same code (one causal token per step), the
baseline every TiDAR figure is compared with.

Target logits for position L+i mix AR and diffusion: beta * AR_i + (1 - beta) * diff_i, where
AR_i is the output at the token before (d_{i-1}) and diff_i the output of the mask of block i
at the same position. beta = 1, the default, is lossless: greedy output equals AR greedy output,
and sampled output is distributed as AR sampling (exact speculative sampling).

Every token is picked by one rule (sampling.py): the argmax of the processed logits plus
Gumbel noise keyed by (seed, absolute position, token) for sampled rows, the plain argmax for
greedy rows. Drafts use the same rule on the diffusion logits at their own positions. Greedy
and seeded rows verify by comparing each draft with the target's choice at its position, so a
seeded row's output is a function of (model, prompt, sampling settings, seed): the same for any
draft length, batch or backend. Unseeded sampled rows verify by residual speculative sampling,
which accepts more (docs/design.md §3.5).

Words: a *row* is a row of the batch (one request); a token's index among a forward's new
tokens is its *query index* (`Layout.causal_index`, `Layout.mask_index`); the *proposals* of a
step are the drafts d_1.. it verifies: `proposal_counts` says how many each row has, the
drafts tensor holds their tokens.

A step is batched over rows on the device, and its results come back in one device->host
transfer (`StepOutput.to_host`). Per-row Python runs only on the host side of that transfer
(counters, stop conditions, text). Every per-row array lives in one `BatchState`
(runtime/batch_state.py), changed only by its `add`, `keep` and `resize`.

Rows are independent: each has its own cached length, sampling settings, seed, stop
conditions and counters; finished rows leave the batch, new rows may join between steps
(`add`), rows may be ended early (`finish`: cancellation, timeout) and the draft shape (b, k)
may change between steps (`set_draft_len`), which is how a server adapts it to the batch. The
KV cache is allocated once (`max_rows` x `max_len` when given) and rows take and return slots.

Hybrid drafts (docs/design.md §3.9, `drafter="hybrid"`): after the step's transfer, which then
also carries TiDAR's next proposals, each row places either those or an n-gram continuation of
its text (runtime/ngram.py), whichever is expected to commit more (`_place_proposals`); the next
step's mask blocks see the placed proposals, and verification is unchanged.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .backends.base import Backend, StepLogits
from .batch_state import BatchState, NewRows, Row
from .cache import KVCache
from .counters import Stats, StepStats, add_per_position  # noqa: F401  (the last two: names callers import)
from .draft_shape import DraftShapeError, validate_draft_shape
from .layout import Layout, next_proposals
from .logits_processor import LogitsProcessor, ProcessorState
from .ngram import (MAX_NGRAM, MIN_MATCH, NgramIndex, NgramProposal, SourceEstimate, check_drafter, choose_source,
                    score)
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
    step_stats: Stats = field(default_factory=Stats)
    """This forward's increments to the request's counters (`Stats.add` sums them)."""
    log_probs: list[float] | None = None
    """One per token of `token_ids` when the request asked for them."""
    result: Result | None = field(default=None, repr=False)
    """On the final delta of a request the engine ran: the request's `Result` (totals, timings)."""
    admission: int | None = None
    """The engine's number for the request, distinct for every request one engine admits (in
    `add` order); None on deltas made outside an engine."""


@dataclass
class Prefill:
    """One request's prefill, on the device until `DecodeEngine.add` reads `first`."""

    row: Row
    drafts: torch.Tensor
    """[1, max(b, 1)]: d_0 .. d_{b-1}."""
    draft_probs: torch.Tensor | None
    """[1, max(b, 1) - 1, V]: the distributions of d_1.. for a residual row, else None."""
    processor_state: ProcessorState | None
    """The row's processor state with d_0 committed (None without processors)."""
    first: torch.Tensor
    """float64 [1, 2]: d_0 and its log prob (0 unless the request asked for it)."""


# ---------------------------------------------------------------------- the phases' outputs
@dataclass
class StepForward:
    """The forward of one step: the new tokens' logits (computed on demand) and each row's cached
    length before it (the position of its d_0)."""

    logits: StepLogits
    past: torch.Tensor
    """[B] int64."""


@dataclass
class Verification:
    """The verdict on every row's proposals."""

    accepted: torch.Tensor
    """[B]: proposals accepted (the step commits accepted + 1 tokens)."""
    next_token: torch.Tensor
    """[B]: the correction (first rejected position) or the bonus token (all accepted)."""
    scores: torch.Tensor | None
    """[B, max(b, 1), V]: the processed target logits (for log probs), None when none were needed."""


@dataclass
class Drafts:
    """The next step's drafts, on the device."""

    tokens: torch.Tensor
    """[B, max(b, 1)]: d_0 (the committed correction or bonus token), then the proposal slots;
    slots past a row's count hold the mask id (padding)."""
    proposal_counts: torch.Tensor | None
    """[B]: real proposals among d_1.. (None for b <= 1: there are none)."""
    probs: torch.Tensor | None
    """[B, b - 1, V]: the proposals' distributions when a row verifies by residual sampling."""


@dataclass
class HostStep:
    """A step's output on the host (`StepOutput.to_host`)."""

    committed: list[int]
    tokens: list[list[int]]
    """Each row's committed tokens (exactly `committed` of them)."""
    log_probs: list[list[float]]
    """Each row's tokens' log probs (empty lists when no row asked for them)."""
    next_drafts: list[list[int]] | None = None
    """Each row's next drafts d_0..d_{b-1} when `to_host` was given them (the hybrid drafter)."""


@dataclass
class StepOutput:
    """What a step commits, on the device."""

    committed: torch.Tensor
    """[B]: tokens committed per row (accepted + 1)."""
    tokens: torch.Tensor
    """[B, max(b, 1)]: the committed tokens d_1..d_accepted then the correction or bonus token;
    entries past `committed` are padding."""
    log_probs: torch.Tensor | None
    """[B, max(b, 1)]: their log probs, None when no row asked for them."""

    def to_host(self, next_drafts: torch.Tensor | None = None) -> HostStep:
        """The step's one device->host transfer: counts, tokens, log probs and, when given, the
        next drafts [B, max(b, 1)] packed in one tensor."""
        width = self.tokens.shape[1]
        parts = [self.committed[:, None], self.tokens] + ([next_drafts] if next_drafts is not None else [])
        if self.log_probs is not None:
            parts = [part.double() for part in parts] + [self.log_probs.double()]
        host = torch.cat(parts, dim=1).tolist()
        committed = [int(row[0]) for row in host]
        drafts = next_drafts.shape[1] if next_drafts is not None else 0
        probs = 1 + width + drafts
        return HostStep(committed, [[int(t) for t in row[1:1 + count]] for row, count in zip(host, committed)],
                        [row[probs:probs + count] for row, count in zip(host, committed)],
                        [[int(t) for t in row[1 + width:probs]] for row in host] if drafts else None)


# ---------------------------------------------------------------------- the engine
class DecodeEngine:
    """Runs requests through prefill and draft-verify steps on one backend."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None = None, draft_len: int | None = None,
                 beta: float = 1.0, max_rows: int | None = None, max_len: int | None = None,
                 draft_blocks: int | None = None, drafter: str = "tidar", max_ngram: int = MAX_NGRAM,
                 min_match: int = MIN_MATCH, verify_only: bool = False, shape_policy=None):
        """`max_rows` x `max_len` sizes the KV cache once (slots per row: prompt + new tokens
        + one step's new tokens); without them the cache is sized by the first requests and
        grows (doubling) when a later one does not fit. `draft_blocks` k: mask blocks per step
        (1..b; None: k = b). `drafter`: where proposals come from, "tidar" (TiDAR's block),
        "hybrid" or "ngram" (docs/design.md §3.9; `max_ngram`, `min_match`: the n-gram match).
        `verify_only`: a caller may set verify-only shapes (b, 0) (docs/design.md §3.10), so the
        rows keep n-gram candidates (`ngram_outlook`) at every shape, AR included; needs a
        drafter other than "tidar". `shape_policy` (an `autotune.BatchDraftPolicy`): before every
        step, `adapt_shape` to it (the policy's shape for the batch size, or with `verify_only` a
        verify-only one)."""
        config = backend.config
        self.backend, self.config, self.tokenizer = backend, config, tokenizer
        if draft_len is None:
            draft_len = config.block_size
        if not 0.0 <= beta <= 1.0:
            raise RequestError(f"beta must be in [0, 1], got {beta!r}")
        for name, value in (("max_rows", max_rows), ("max_len", max_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        try:
            self.drafter = check_drafter(drafter)
        except ValueError as error:
            raise RequestError(str(error)) from None
        draft_blocks = self.check_draft_len(draft_len, draft_blocks)
        for name, value in (("max_ngram", max_ngram), ("min_match", min_match)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        self.max_ngram, self.min_match = max_ngram, min_match
        if verify_only and self.drafter == "tidar":
            raise RequestError("verify-only steps verify n-gram proposals: they need drafter hybrid or ngram, "
                               "not tidar")
        self.verify_only, self.shape_policy = verify_only, shape_policy
        self.draft_len, self.draft_blocks, self.beta = draft_len, draft_blocks, beta
        self.max_rows, self.max_len = max_rows, max_len
        self.layout = Layout.decode(draft_len, draft_blocks)
        self.cache: KVCache | None = None
        self.batch = BatchState(config.vocab_size)
        self._admissions = itertools.count()  # numbers of admitted requests (`Delta.admission`)

    @property
    def rows(self) -> list[Row]:
        """The rows of the batch, in order."""
        return self.batch.rows

    @property
    def batch_size(self) -> int:
        """Rows in the batch now."""
        return len(self.batch)

    def request_ids(self) -> list[object]:
        """The request ids of the rows in the batch, in row order."""
        return [row.request.request_id for row in self.rows]

    def check_draft_len(self, draft_len: int, draft_blocks: int | None = None) -> int:
        """Raise RequestError unless this model decodes with the draft shape (`draft_len` b,
        `draft_blocks` k; None: k = b): `draft_shape.validate_draft_shape`, k = 0 (verify-only)
        included when the drafter proposes n-grams. Returns k."""
        try:
            return validate_draft_shape(self.config, draft_len, draft_blocks,
                                        verify_only=self.drafter != "tidar")[1]
        except DraftShapeError as error:
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
        # The mask id is an ordinary token in the prompt (e.g. <|fim_pad|> of a FIM prompt): masks are
        # the slots the layout places, never recognised by their id (docs/design.md §1.1).
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
        """Slots a row of `request` may use: any draft length fits without growing the cache. A row
        ends at max_position_embeddings tokens (`_emit`), so no row needs more than
        `max_slots()`, however large its max_new_tokens."""
        used = min(len(request.prompt_ids) + request.max_new_tokens, self.config.max_position_embeddings)
        return used + Layout.decode(self.config.block_size).num_new

    def max_slots(self) -> int:
        """The most KV slots any row of this model can use (`_capacity` of the longest request):
        a `max_len` that never refuses a request the model can serve."""
        return self.config.max_position_embeddings + Layout.decode(self.config.block_size).num_new

    def allocate_cache(self) -> KVCache:
        """Make the KV cache now, `max_rows` x `max_len` (both must be set), so that serving never
        reallocates it (a server does this before it reports ready: CUDA graphs captured on it
        stay valid, backends/cuda_graphs.py); returns it. An existing cache is kept."""
        if self.max_rows is None or self.max_len is None:
            raise ValueError("allocate_cache needs max_rows and max_len (the cache is otherwise sized by requests)")
        if self.cache is None:
            self.cache = self.backend.new_cache(self.max_rows, self.max_len)
            self.cache.clear()
        return self.cache

    @property
    def fits_cache(self) -> bool:
        """Whether the cache's capacity follows what the rows use (`KVCache.fit` before every
        forward): for a backend whose forward reads every slot, unless `max_len` fixed the cache."""
        return self.backend.reads_whole_cache and self.max_len is None

    def _fit_cache(self, need: int) -> None:
        """Before a forward of a `fits_cache` engine: room for `need` slots in every row, and not
        much more (the rows' views taken later see the new storage)."""
        if self.fits_cache:
            self.cache.fit(max(need, self.cache.max_length() + self.layout.num_new if self.rows else 0))

    def _reserve(self, requests: Sequence[Request]) -> None:
        """Make room for `requests` next to the active rows: the cache is made once, sized by
        `max_rows` / `max_len` when given, and grows (doubling) only when they were not; a
        `fits_cache` engine's capacity follows the rows (`_fit_cache`)."""
        rows = len(self.rows) + len(requests)
        slots = max(self._capacity(r) for r in requests)
        if self.max_rows is not None and rows > self.max_rows:
            raise RequestError(f"{rows} rows exceed max_rows = {self.max_rows}")
        if self.max_len is not None and slots > self.max_len:
            raise RequestError(f"a request needs {slots} KV slots (prompt + max_new_tokens + one step), more than "
                               f"max_len = {self.max_len}")
        if self.fits_cache:
            slots = max(Layout.prefill(len(r.prompt_ids), self.draft_len).num_new for r in requests)
        if self.cache is None:
            self.cache = self.backend.new_cache(self.max_rows or rows, self.max_len or slots)
            self.cache.clear()
        elif rows > self.cache.max_rows or (slots > self.cache.capacity and not self.fits_cache):
            grow = lambda need, have: have if need <= have else max(need, 2 * have)  # noqa: E731
            # (a fitted cache's capacity is set by _fit_cache alone: growing it here would allocate twice)
            capacity = self.cache.capacity if self.fits_cache else grow(slots, self.cache.capacity)
            self.cache.grow(grow(rows, self.cache.max_rows), capacity)
        self._fit_cache(slots)

    def add(self, requests: Sequence[Request]) -> list[Delta]:
        """Validate and prefill `requests`, join them to the batch; return their first deltas.
        Nothing is added unless every request is valid."""
        for request in requests:
            self.check(request)
        if not requests:
            return []
        self._reserve(requests)
        slots = self.cache.add_rows(len(requests))
        new, prefills, firsts = NewRows([], [], [], []), [], []
        for slot, request in zip(slots, requests):
            prefill = self._prefill(request, self.cache.row(slot))
            prefill.row.admission = next(self._admissions)
            prefills.append(Stats(forward_passes=1, prefill_seconds=time.perf_counter() - prefill.row.started))
            new.rows.append(prefill.row)
            new.drafts.append(prefill.drafts)
            new.draft_probs.append(prefill.draft_probs)
            new.processor_states.append(prefill.processor_state)
            firsts.append(torch.cat([prefill.first, prefill.drafts.double()], dim=1))
        self.batch.add(new, self.cache.device)
        # the first tokens, their log probs and the drafts: one device->host transfer
        firsts = torch.cat(firsts).tolist()
        deltas = [self._emit(row, prefill, [int(first[0])], first[1:2])
                  for row, prefill, first in zip(new.rows, prefills, firsts)]
        if self.proposes_ngrams:
            joined = range(len(self.rows) - len(new.rows), len(self.rows))
            self._place_proposals(joined, [[int(t) for t in first[2:]] for first in firsts])
        self._drop_finished()
        return deltas

    def set_draft_len(self, draft_len: int, draft_blocks: int | None = None) -> None:
        """Use the draft shape (b, k) = (`draft_len`, `draft_blocks`; None: k = b) from the next step
        on. Rows keep their output; their pending proposals are cut to the new length, or padded
        (pad slots are not proposals: never verified, never counted; docs/design.md §3.4)."""
        draft_blocks = self.check_draft_len(draft_len, draft_blocks)
        if (draft_len, draft_blocks) == (self.draft_len, self.draft_blocks):
            return
        # The rows' candidates stay: each is what a source offered for the positions after d_0,
        # which a new shape does not move, so the next step still scores them fairly.
        self.draft_blocks, self.layout = draft_blocks, Layout.decode(draft_len, draft_blocks)
        if draft_len != self.draft_len:
            self.draft_len = draft_len
            self.batch.resize(draft_len)

    def finish(self, request_ids: Sequence[object], reason: str) -> list[Delta]:
        """End the rows of `request_ids` now with finish reason `reason` (e.g. "cancelled",
        "timeout"); their cache rows are freed. Returns the final delta of each (the text held
        back for stop strings, flushed; the `Result`)."""
        wanted = set(request_ids)
        deltas = []
        for row in self.rows:
            if row.request.request_id in wanted and row.finish_reason is None:
                row.finish(reason)
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
        self.batch.clear()
        self.cache = None

    # ------------------------------------------------------------------ prefill
    def _prefill(self, request: Request, cache: KVCache) -> "Prefill":
        """Prefill one request into its cache row (`cache`, a one-row view)."""
        started = time.perf_counter()
        b, mask_id = self.draft_len, self.config.mask_token_id
        prompt = list(request.prompt_ids)
        L = len(prompt)
        layout = Layout.prefill(L, b)
        logits = StepLogits(self.backend, torch.tensor([prompt + [mask_id] * b], device=cache.device), layout, cache)
        cache.commit([L])
        params = request.sampling
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        eos = request.eos_ids if request.eos_ids is not None else self.config.eos_token_ids
        row = Row(request=request, prompt_ids=prompt, eos_ids=frozenset(eos), seed=seed, stats=Stats.positions(b),
                  detokenizer=IncrementalDetokenizer(self.tokenizer, request.stop) if self.tokenizer else None,
                  started=started, proposal_count=max(b - 1, 0))
        sampling = SamplingBatch.of([params], [seed], cache.device)
        processor = state = None
        if params.processes_logits:
            state = ProcessorState.of_prompt(prompt, self.config.vocab_size, cache.device)
            processor = LogitsProcessor([params], [row.eos_ids], state, self.config.vocab_size)
        adjust = processor.adjust if processor is not None else None
        # d_0 at position L: the AR output at the last prompt token, mixed (beta < 1) with the
        # block's mask 0 at the same position; d_1..d_{b-1} at positions L+1..: masks 1..b-1.
        # The LM head runs on these query indices only.
        positions = torch.arange(L, L + max(b, 1), device=cache.device)[None]
        masks = layout.mask_index(0, torch.arange(b, device=cache.device)) if b else positions[0, :0]
        mixed = bool(b) and self.beta < 1.0
        query = torch.cat([layout.causal_index(device=cache.device)[-1:], masks[: int(mixed)], masks[1:]])
        out = logits.at(query[None])
        target = self._mix(out[:, :1], out[:, 1:2] if mixed else None)
        if request.return_log_probs:
            first, log_prob = sampling.choose_with_log_probs(target, positions[:, :1], adjust)
        else:
            first = sampling.choose(target, positions[:, :1], adjust)
            log_prob = torch.zeros_like(first, dtype=torch.float64)
        if state is not None:
            state.commit(first, torch.ones(1, dtype=torch.long, device=cache.device))
        proposal_tokens, probs = sampling.draft(out[:, 1 + mixed:], positions[:, 1:], adjust)
        return Prefill(row, torch.cat([first, proposal_tokens], dim=1), probs, state,
                       torch.cat([first.double(), log_prob.double()], dim=1))

    # ------------------------------------------------------------------ step
    def step(self) -> list[Delta]:
        """One forward for every active row; returns one delta per row."""
        if not self.rows:
            return []
        if self.shape_policy is not None:
            self.adapt_shape(self.shape_policy, len(self.rows))
        self._fit_cache(0)
        forward = self._forward()
        verification = self._verify(forward)
        output = self._commit(verification)
        drafts = self._draft(forward, verification, output)
        self._set_drafts(drafts)
        host = output.to_host(drafts.tokens if self.hybrid else None)
        self.cache.commit(output.committed, host.committed)
        b, k = self.draft_len, self.draft_blocks
        deltas = []
        for row, committed, tokens, log_probs in zip(self.rows, host.committed, host.tokens, host.log_probs):
            step = Stats.of_step(b, proposed=row.proposal_count, accepted=committed - 1, source=row.proposal_source)
            row.proposal_count = max(next_proposals(committed - 1, b, k)[2], 0)
            row.proposal_source = "tidar"
            deltas.append(self._emit(row, step, tokens, log_probs))
        if self.proposes_ngrams:
            for row, tokens in zip(self.rows, host.tokens):
                if row.finish_reason is None:
                    self._learn(row, tokens)
            self._place_proposals(range(len(self.rows)), host.next_drafts or [[] for _ in self.rows])
        self._drop_finished()
        return deltas

    # ------------------------------------------------------------------ hybrid drafts
    @property
    def hybrid(self) -> bool:
        """Whether proposals may come from the n-gram proposer (docs/design.md §3.9): a drafter
        other than "tidar" and proposals to place (b >= 2)."""
        return self.drafter != "tidar" and self.draft_len > 1

    @property
    def proposes_ngrams(self) -> bool:
        """Whether the rows keep n-gram candidates after each step: when they can be placed
        (`hybrid`) and, with `verify_only`, at every shape (the caller values them)."""
        return self.hybrid or self.verify_only

    def adapt_shape(self, policy, rows: int, shape=None, overhead: float = 0.0) -> None:
        """Use `shape` (b, k) (default: `policy.best_shape(rows, overhead)`) for the next step, or with
        `verify_only` the verify-only shape that `policy.with_verify_only` values higher
        (docs/design.md §3.10); `overhead`: seconds each step costs beyond the engine's."""
        shape = policy.best_shape(rows, overhead) if shape is None else shape
        if self.verify_only:
            shape = policy.with_verify_only(rows, shape, self.ngram_outlook(), overhead=overhead)
        self.set_draft_len(*shape)

    def ngram_outlook(self) -> list[list[float]]:
        """Per row, the expected accepted proposals of its pending n-gram candidate if a step
        verified its first c = 0..block_size-1 of them (its `SourceEstimate`; zeros for a row
        without one): what a verify-only step (docs/design.md §3.10) is worth to the row."""
        width = self.config.block_size
        outlook = []
        for row in self.rows:
            candidate = row.candidates.get("ngram", ())
            curve = row.estimates["ngram"].expected_curve(len(candidate)) if candidate else [0.0]
            outlook.append((curve + [curve[-1]] * width)[:width])
        return outlook

    def _learn(self, row: Row, committed: list[int]) -> None:
        """Score every source's candidate for the step that committed `committed` (t_1..t_a, at the
        positions of d_1..d_a), placed or not, and extend the row's text with them."""
        for source, candidate in row.candidates.items():
            row.estimates[source].observe(*score(candidate, committed))
        if row.ngram is not None and len(row.ngram.tokens) + len(committed) == len(row.prompt_ids) + len(row.tokens):
            row.ngram.extend(committed)

    def _start_hybrid(self, row: Row) -> None:
        """The row's n-gram index over its text so far and its estimates (at its first placement:
        the prefill, or the first step after a draft length of 1 or less made it stop)."""
        text = row.prompt_ids + row.tokens
        if row.ngram is None or len(row.ngram.tokens) != len(text):
            row.ngram = NgramIndex(text, self.max_ngram, row.eos_ids)
        if not row.estimates:
            row.estimates = {"tidar": SourceEstimate(), "ngram": SourceEstimate()}

    def _place_proposals(self, indices: Sequence[int], next_drafts: list[list[int]]) -> None:
        """For each unfinished row of `indices`, with TiDAR's next drafts `next_drafts` (d_0..,
        the proposals first among d_1..), the source of its next proposals (`ngram.choose_source`);
        rows that take the n-gram's continuation get it written into the batch's drafts. The
        n-gram candidate is kept whole (up to block_size - 1 tokens, for `ngram_outlook`), its
        first b - 1 placed; below b = 2 nothing is placed."""
        width = self.draft_len - 1
        changed, proposals = [], []
        for index, drafts in zip(indices, next_drafts):
            row = self.rows[index]
            if row.finish_reason is not None:
                continue
            self._start_hybrid(row)
            tidar = tuple(drafts[1:1 + row.proposal_count])
            whole = row.ngram.propose(self.config.block_size - 1)
            row.candidates = {"tidar": tidar}
            if whole.match_len >= self.min_match:
                row.candidates["ngram"] = whole.tokens
            if width < 1:
                continue
            proposal = NgramProposal(whole.tokens[:width], whole.match_len)
            source = choose_source(self.drafter, row.estimates["tidar"], row.estimates["ngram"], len(tidar),
                                   proposal, self.min_match)
            row.proposal_source = source
            if source == "ngram":
                changed.append(index)
                proposals.append(proposal.tokens)
        self.batch.place_proposals(changed, proposals, self.config.mask_token_id)

    def _forward(self) -> StepForward:
        """Run the model on every row's drafts d_0..d_{b-1} and the step's mask blocks."""
        layout, drafts = self.layout, self.batch.drafts
        masks = torch.full((len(self.batch), layout.num_new - layout.causal_len), self.config.mask_token_id,
                           device=drafts.device)
        past = self.cache.lengths.clone()  # the position of each row's d_0
        return StepForward(StepLogits(self.backend, torch.cat([drafts, masks], dim=1), layout, self.cache), past)

    def _verify(self, forward: StepForward) -> Verification:
        """The target logits at the positions of d_1..d_b (past + 1 ..), and the verdict on the
        proposals. The target for d_i is the AR output at d_{i-1} (causal query index i - 1),
        mixed when beta < 1 with the mask at the same position of block i, or of the last block
        when i > k. The LM head runs on these query indices only."""
        b, layout, batch = self.draft_len, self.layout, self.batch
        width = max(b, 1)
        device = batch.drafts.device
        query = layout.causal_index(width, device)
        mixed = bool(b) and self.beta < 1.0
        if mixed:
            mixing_block = query.clamp(max=self.draft_blocks - 1)
            query = torch.cat([query, layout.mask_index(mixing_block, query - mixing_block)])
        logits = forward.logits.at(query[None].expand(len(batch), -1))
        target = self._mix(logits[:, :width], logits[:, width:] if mixed else None)
        # the target at d_i's position assumes d_1..d_{i-1} accepted: with processors, they count
        processor = batch.processor
        adjust = (lambda scores: processor.adjust(scores, batch.drafts[:, 1:width])) if processor is not None else None
        positions = forward.past[:, None] + torch.arange(1, width + 1, device=device)
        # proposal slots past a row's count (k < b, §3.4) are padding: never accepted
        accepted, next_token, scores = batch.sampling.verify(
            batch.drafts[:, 1:], batch.draft_probs, target, positions, adjust,
            proposal_counts=batch.proposal_counts if b > 1 else None)
        return Verification(accepted, next_token, scores)

    def _commit(self, verification: Verification) -> StepOutput:
        """The committed tokens d_1..d_accepted then the correction or bonus token; the logits
        processors count them; their log probs when a row asked for them."""
        batch, accepted, next_token = self.batch, verification.accepted, verification.next_token
        width = batch.drafts.shape[1]
        committed = accepted + 1
        shifted = torch.cat([batch.drafts[:, 1:], next_token[:, None]], dim=1)
        tokens = torch.where(torch.arange(width, device=accepted.device) < accepted[:, None], shifted,
                             next_token[:, None])
        if batch.processor is not None:
            batch.processor.state.commit(tokens, committed)
        log_probs = None
        if batch.wants_log_probs:
            log_probs = (batch.sampling.log_probs(verification.scores, tokens) if verification.scores is not None
                         else torch.zeros(tokens.shape, device=tokens.device))
        return StepOutput(committed, tokens, log_probs)

    def _draft(self, forward: StepForward, verification: Verification, output: StepOutput) -> Drafts:
        """The next drafts at positions past + committed ..: d_0 = the correction or bonus token;
        proposals from block `accepted` (it saw d_0..d_accepted), masks 1..b-1; when accepted >= k,
        from block k-1's masks after the new d_0, fewer of them (`next_proposals`, docs/design.md
        §3.4); the slots past the count are padding. They are processed with the committed state
        of the logits processors (which holds the new d_0)."""
        b, batch = self.draft_len, self.batch
        d0 = verification.next_token[:, None]
        if b <= 1:
            return Drafts(d0, None, None)
        if self.draft_blocks == 0:  # verify-only (§3.10): no block drafted anything; n-grams are placed after
            pads = torch.full((d0.shape[0], b - 1), self.config.mask_token_id, dtype=d0.dtype, device=d0.device)
            return Drafts(torch.cat([d0, pads], dim=1), torch.zeros_like(verification.accepted), None)
        block, first_mask, count = next_proposals(verification.accepted, b, self.draft_blocks)
        slot = torch.arange(b - 1, device=d0.device)[None]
        masks = (first_mask[:, None] + slot).clamp(max=b - 1)
        positions = forward.past[:, None] + output.committed[:, None] + 1 + slot
        processor = batch.processor
        proposal_tokens, probs = batch.sampling.draft(forward.logits.at(self.layout.mask_index(block[:, None], masks)),
                                                      positions, processor.adjust if processor is not None else None)
        proposal_tokens = torch.where(slot < count[:, None], proposal_tokens, self.config.mask_token_id)
        return Drafts(torch.cat([d0, proposal_tokens], dim=1), count, probs)

    def _set_drafts(self, drafts: Drafts) -> None:
        """The next step's drafts replace the batch's (the distributions only when drawn)."""
        self.batch.drafts = drafts.tokens
        if drafts.proposal_counts is not None:
            self.batch.proposal_counts = drafts.proposal_counts
        if drafts.probs is not None:
            self.batch.draft_probs = drafts.probs

    def _mix(self, ar_logits: torch.Tensor, diff_logits: torch.Tensor | None) -> torch.Tensor:
        if diff_logits is None or self.beta == 1.0:
            return ar_logits
        return self.beta * ar_logits.float() + (1.0 - self.beta) * diff_logits.float()

    # ------------------------------------------------------------------ output
    def _emit(self, row: Row, step: Stats, new_tokens: list[int], new_log_probs: Sequence[float] = ()) -> Delta:
        """Count the forward's `step` increments, append committed tokens (and their log probs
        when the request asked for them) to `row`, apply the stop conditions, return the delta
        (with the `Result` when the row finished). The text grows token by token (no re-decoding
        of the output)."""
        request = row.request
        row.stats.add(step)
        before = len(row.tokens)
        limit = self.config.max_position_embeddings
        cut, reason = False, None
        for index, token in enumerate(new_tokens):
            row.tokens.append(token)
            if request.return_log_probs:
                row.log_probs.append(new_log_probs[index])
            if row.detokenizer is not None and row.detokenizer.add(token):
                reason, cut = "stop", True  # a stop string: the text ends before it
                break
            if token in row.eos_ids:
                reason = "stop"
                break
            if len(row.tokens) >= request.max_new_tokens or len(row.prompt_ids) + len(row.tokens) >= limit:
                reason = "length"
                break
        if row.detokenizer is not None:
            if reason is not None and not cut and row.detokenizer.flush():
                reason = "stop"
            row.text = row.detokenizer.text
        if reason is not None:
            row.finish(reason)
        finished = row.finish_reason is not None
        text = row.detokenizer.delta(final=finished) if row.detokenizer else ""
        return Delta(request.request_id, row.tokens[before:], text, finished, row.finish_reason, step,
                     row.log_probs[before:] if request.return_log_probs else None,
                     self._result(row) if finished else None, row.admission)

    def _drop_finished(self) -> None:
        """Finished rows leave the batch: the cache frees their rows (the last rows fill the
        holes) and the batch state keeps the others in the cache's new order."""
        gone = [i for i, row in enumerate(self.rows) if row.finish_reason is not None]
        if gone:
            self.batch.keep(self.cache.remove_rows(gone))

    def _result(self, row: Row) -> Result:
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

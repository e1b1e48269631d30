"""The TiDAR draft-verify loop (SPEC §3), for batches of independent requests.

One readable function per phase:
  prefill  the prompt (causal) plus a block of b masks; d_0 = the target choice at the prompt's
           end, d_1..d_{b-1} = the masks' diffusion choices.
  step     one forward over b drafts and b blocks of b masks; verify d_1..d_{b-1} against the
           target logits; commit a tokens; the next d_0 is the correction or bonus token and the
           next proposals come from block a.
Draft length 0 is plain AR decoding through the same code (one causal token per step), the
baseline every TiDAR figure is compared with.

Target logits for position L+i mix AR and diffusion: beta * AR_i + (1 - beta) * diff_i, where
AR_i is the output at the token before (d_{i-1}) and diff_i the output of the first mask of
block i (same position). beta = 1, the default, is lossless: greedy output equals AR greedy
output, and sampled output is distributed as AR sampling (exact speculative sampling).

Rows are independent: each has its own cached length, sampling settings, random generator,
stop conditions and statistics; finished rows leave the batch, new rows may join between
steps (`add`), rows may be ended early (`finish`: cancellation, timeout) and the draft length
may change between steps (`set_draft_len`), which is how a server adapts it to the batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .backend import Backend
from .cache import KVCache
from .layout import Layout
from .sampling import SamplingParams, Verdict, probabilities, sample, verify_greedy, verify_sampled
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


@dataclass
class Stats:
    """Per-request counters, in the style of vLLM's speculative-decoding metrics."""

    forward_passes: int = 0
    """Forwards this request took part in (prefill included)."""
    drafts: int = 0
    """Steps that verified proposals."""
    draft_tokens: int = 0
    """Proposals verified (b - 1 per step)."""
    accepted_tokens: int = 0
    """Proposals accepted."""
    accepted_per_position: list[int] = field(default_factory=list)
    """accepted_per_position[i]: how often proposal d_{i+1} was accepted."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class Delta:
    """What one forward added to one request (the unit of streaming)."""

    request_id: object
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stats: Stats | None = field(default=None, repr=False, compare=False)
    """The request's counters so far (cumulative; the final delta carries the totals)."""


@dataclass
class Result:
    request_id: object
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: Stats
    draft_len: int
    seconds: float
    request: Request = field(repr=False, compare=False, default=None)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.stats.forward_passes, 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Row:
    request: Request
    prompt_ids: list[int]
    eos_ids: frozenset[int]
    generator: torch.Generator | None
    drafts: list[int]  # d_0 .. d_{b-1}; d_0 is committed (emitted), its KV is not cached yet
    proposal_probs: torch.Tensor | None  # q of d_1 .. d_{b-1} (sampling only)
    stats: Stats
    detokenizer: IncrementalDetokenizer | None
    started: float
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class DecodeEngine:
    """Runs requests through prefill and draft-verify steps on one backend."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None = None, draft_len: int | None = None,
                 beta: float = 1.0):
        config = backend.config
        self.backend, self.config, self.tokenizer = backend, config, tokenizer
        if draft_len is None:
            draft_len = config.block_size
        self._check_draft_len(draft_len)
        if not 0.0 <= beta <= 1.0:
            raise RequestError(f"beta must be in [0, 1], got {beta!r}")
        self.draft_len, self.beta = draft_len, beta
        self.layout = Layout.decode(draft_len)
        self.cache: KVCache | None = None
        self.rows: list[_Row] = []
        self.finished: list[Result] = []
        """Results of rows that finished, in finishing order (drivers take theirs out)."""

    def _check_draft_len(self, draft_len: int) -> None:
        block = self.config.block_size
        if isinstance(draft_len, bool) or not isinstance(draft_len, int) or not 0 <= draft_len <= block:
            raise RequestError(f"draft_len must be an integer in [0, block_size={block}] "
                               f"(0 = AR decoding), got {draft_len!r}")

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

    def _capacity(self, request: Request) -> int:
        return len(request.prompt_ids) + request.max_new_tokens + self.layout.num_new

    def add(self, requests: Sequence[Request]) -> list[Delta]:
        """Validate and prefill `requests`, join them to the batch; return their first deltas.
        Nothing is added unless every request is valid."""
        for request in requests:
            self.check(request)
        if not requests:
            return []
        capacity = max(self._capacity(r) for r in requests)
        if self.cache is not None:
            capacity = max(capacity, self.cache.capacity)
        cache = self.backend.new_cache(len(requests), capacity)
        rows = [self._prefill(request, cache.row(i)) for i, request in enumerate(requests)]
        self.cache = cache if self.cache is None else self.cache.concat(cache)
        self.rows.extend(rows)
        deltas = [self._emit(row, [row.drafts[0]]) for row in rows]
        self._drop_finished()
        return deltas

    def set_draft_len(self, draft_len: int) -> None:
        """Use draft length `draft_len` from the next step on. Rows keep their output; their pending
        proposals are cut to the new length, or padded with repeats of the last one. A padded
        proposal's distribution is a point mass, so verification stays exact (speculative
        sampling is lossless for any proposal whose distribution is known)."""
        self._check_draft_len(draft_len)
        if draft_len == self.draft_len:
            return
        self.draft_len, self.layout = draft_len, Layout.decode(draft_len)
        for row in self.rows:
            wanted = max(draft_len, 1)
            missing = wanted - len(row.drafts)
            if missing <= 0:
                row.drafts = row.drafts[:wanted]
                if row.proposal_probs is not None:
                    row.proposal_probs = row.proposal_probs[: wanted - 1]
            else:
                row.drafts = row.drafts + [row.drafts[-1]] * missing
                if row.generator is not None:
                    point = torch.zeros(missing, self.config.vocab_size)
                    point[:, row.drafts[-1]] = 1.0
                    known = row.proposal_probs if row.proposal_probs is not None else point[:0]
                    row.proposal_probs = torch.cat([known, point.to(known.dtype)])
            positions = row.stats.accepted_per_position
            positions.extend([0] * (draft_len - 1 - len(positions)))
        if self.cache is not None:
            self.cache.reserve(max(self._capacity(row.request) for row in self.rows))

    def finish(self, request_ids: Sequence[object], reason: str) -> list[Delta]:
        """End the rows of `request_ids` now with finish reason `reason` (e.g. "cancelled",
        "timeout"); their cache rows are freed and their results join `finished`. Returns the
        final delta of each (the text held back for stop strings, flushed)."""
        wanted = set(request_ids)
        deltas = []
        for row in self.rows:
            if row.request.request_id in wanted and row.finish_reason is None:
                row.finish_reason = reason
                row.stats.decode_seconds = time.perf_counter() - row.started - row.stats.prefill_seconds
                text = row.detokenizer.delta(row.text, final=True) if row.detokenizer else ""
                deltas.append(Delta(row.request.request_id, [], text, True, reason, row.stats))
        self._drop_finished()
        return deltas

    # ------------------------------------------------------------------ phases
    def _prefill(self, request: Request, cache: KVCache) -> _Row:
        started = time.perf_counter()
        b = self.draft_len
        prompt = list(request.prompt_ids)
        layout = Layout.prefill(len(prompt), b)
        tokens = torch.tensor([prompt + [self.config.mask_token_id] * b])
        logits = self.backend.forward(tokens, layout, cache)[0]
        cache.commit([len(prompt)])
        params = request.sampling
        eos = request.eos_ids if request.eos_ids is not None else self.config.eos_token_ids
        holdback = max((len(s) for s in request.stop), default=1) - 1
        row = _Row(request=request, prompt_ids=prompt, eos_ids=frozenset(eos),
                   generator=None if params.greedy else params.make_generator(),
                   drafts=[], proposal_probs=None, stats=Stats(accepted_per_position=[0] * max(b - 1, 0)),
                   detokenizer=IncrementalDetokenizer(self.tokenizer, holdback) if self.tokenizer else None,
                   started=started)
        # Target for position L: AR at the last prompt token, mixed with mask 0 (same position).
        target = self._mix(logits[len(prompt) - 1: len(prompt)], logits[len(prompt): len(prompt) + 1] if b else None)
        first = int(target.argmax(-1)) if params.greedy else int(sample(probabilities(target[0], params), row.generator))
        self._set_drafts(row, first, logits[len(prompt) + 1: len(prompt) + b])
        row.stats.forward_passes = 1
        row.stats.prefill_seconds = time.perf_counter() - started
        return row

    def step(self) -> list[Delta]:
        """One forward for every active row; returns one delta per row."""
        if not self.rows:
            return []
        b, layout = self.draft_len, self.layout
        masks = [self.config.mask_token_id] * (layout.num_new - layout.causal_len)
        tokens = torch.tensor([row.drafts + masks for row in self.rows])
        logits = self.backend.forward(tokens, layout, self.cache)
        verdicts = [self._verify(row, logits[r]) for r, row in enumerate(self.rows)]
        self.cache.commit([v.accepted + 1 for v in verdicts])
        deltas = []
        for r, (row, verdict) in enumerate(zip(self.rows, verdicts)):
            a = verdict.accepted + 1
            stats = row.stats
            stats.forward_passes += 1
            if b > 1:
                stats.drafts += 1
                stats.draft_tokens += b - 1
                stats.accepted_tokens += a - 1
                for i in range(a - 1):
                    stats.accepted_per_position[i] += 1
            new_tokens = row.drafts[1:a] + [verdict.next_token]
            # Next proposals: block a (index a - 1), its masks 1..b-1.
            start = layout.block_start(a - 1) if b else 0
            self._set_drafts(row, verdict.next_token, logits[r, start + 1: start + b])
            deltas.append(self._emit(row, new_tokens))
        self._drop_finished()
        return deltas

    def _mix(self, ar_logits: torch.Tensor, diff_logits: torch.Tensor | None) -> torch.Tensor:
        if diff_logits is None or self.beta == 1.0:
            return ar_logits
        return self.beta * ar_logits.float() + (1.0 - self.beta) * diff_logits.float()

    def _verify(self, row: _Row, logits: torch.Tensor) -> Verdict:
        """Check d_1..d_{b-1} of `row` against the target logits of positions L+1..L+b."""
        b = self.draft_len
        ar = logits[: max(b, 1)]  # output at d_{i-1} predicts position L+i
        diff = logits[self.layout.causal_len:: b][:b] if b else None  # mask 0 of blocks 1..b
        target = self._mix(ar, diff)
        proposals = torch.tensor(row.drafts[1:], dtype=torch.long)
        if row.generator is None:
            return verify_greedy(proposals, target)
        params = row.request.sampling
        return verify_sampled(proposals, row.proposal_probs, probabilities(target, params), row.generator)

    def _set_drafts(self, row: _Row, first: int, mask_logits: torch.Tensor) -> None:
        """d_0 = `first`; d_1..d_{b-1} = the diffusion choices of `mask_logits` [b-1, V]."""
        if self.draft_len <= 1:
            row.drafts = [first]
            return
        if row.generator is None:
            row.drafts = [first] + mask_logits.argmax(-1).tolist()
        else:
            row.proposal_probs = probabilities(mask_logits, row.request.sampling)
            row.drafts = [first] + sample(row.proposal_probs, row.generator).tolist()

    # ------------------------------------------------------------------ output
    def _emit(self, row: _Row, new_tokens: list[int]) -> Delta:
        """Append committed tokens to `row`, apply the stop conditions, return the delta."""
        request = row.request
        before = len(row.tokens)
        limit = self.config.max_position_embeddings
        for token in new_tokens:
            row.tokens.append(token)
            if token in row.eos_ids:
                row.finish_reason = "stop"
                break
            if len(row.tokens) >= request.max_new_tokens or len(row.prompt_ids) + len(row.tokens) >= limit:
                row.finish_reason = "length"
                break
        if self.tokenizer is not None:
            row.text = self.tokenizer.decode(row.tokens)
            if request.stop:
                self._apply_stop_strings(row, before)
        if row.finish_reason is not None:
            row.stats.decode_seconds = time.perf_counter() - row.started - row.stats.prefill_seconds
        text = row.detokenizer.delta(row.text, final=row.finish_reason is not None) if row.detokenizer else ""
        return Delta(request.request_id, row.tokens[before:], text, row.finish_reason is not None,
                     row.finish_reason, row.stats)

    def _apply_stop_strings(self, row: _Row, before: int) -> None:
        hits = [(row.text.find(s), s) for s in row.request.stop if s in row.text]
        if not hits:
            return
        cut, stop = min(hits)
        # Keep the shortest token prefix whose text contains the stop string.
        for count in range(before + 1, len(row.tokens) + 1):
            if stop in self.tokenizer.decode(row.tokens[:count]):
                del row.tokens[count:]
                break
        row.text = row.text[:cut]
        row.finish_reason = "stop"

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        self.finished.extend(self._result(row) for row in self.rows if row.finish_reason is not None)
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.cache.keep_rows(keep)
        else:
            self.cache = None

    def _result(self, row: _Row) -> Result:
        return Result(row.request.request_id, row.prompt_ids, list(row.tokens), row.text, row.finish_reason,
                      row.stats, self.draft_len, time.perf_counter() - row.started, row.request)

    # ------------------------------------------------------------------ drivers
    def stream(self, requests: Sequence[Request]) -> Iterator[list[Delta]]:
        """Run `requests` as one batch; yield the deltas of every forward as they come."""
        yield self.add(requests)
        while self.rows:
            yield self.step()

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run `requests` to completion as one batch; results in request order."""
        requests = [dataclasses.replace(r) for r in requests]  # distinct objects to match results by
        order = {id(r): i for i, r in enumerate(requests)}
        for _ in self.stream(requests):
            pass
        mine = [r for r in self.finished if id(r.request) in order]
        self.finished = [r for r in self.finished if id(r.request) not in order]
        return sorted(mine, key=lambda r: order[id(r.request)])

"""Choose the draft shape (b, k) by measurement: step latency on this device and backend, times
the model's measured tokens per step (docs/design.md §3.4).

A candidate is a draft length b (k = b mask blocks, the paper's step) or a shape (b, k) with
k <= b blocks; (0, 0) and 0 are AR. A step costs latency(b, k, batch), which grows with its
b + k*b query tokens per row once they stop being "free". The best shape maximizes expected
tokens per step / latency (expected tokens per second).

The expected tokens per step of a shape (`expected_tokens_per_step`, the one definition) is
what was measured for it: the replayed tokens per step (runtime/replay.py: the engine's greedy
decode loop run on the host over held-out prompts, exact for every (b, k)) when
`acceptance.json` holds them, else an estimate from acceptance (`expected_tokens`): with k = b
a step commits E[a | b] = 1 + sum_{i=1}^{b-1} P(d_1..d_i all accepted); with k < b a step after
one that committed a > k tokens has fewer proposals, and the long-run tokens per step is the
stationary expectation of that Markov chain, with P(first i accepted | shift s) =
P(d_1..d_{s+i}) / P(d_1..d_s) (optimistic: the shifted masks' block did not see the tokens
before them).

Both come from `acceptance.json` in the checkpoint folder (written by `tidar bench
--write-acceptance` from held-out prompts; acceptance at the full block size, used for every
shorter b too); without it, a short calibration run on generic prompts measures acceptance.
`tidar bench` checks the choice against measured tokens/s.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from .backends.base import Backend
from .layout import Layout, check_draft_shape, next_proposals

ACCEPTANCE_FILE = "acceptance.json"
REPLAY_FIELD = "replayed_tokens_per_step"
"""The field of acceptance.json with the replayed tokens per step, {"b{b}k{k}": tokens/step}."""
CALIBRATION_PROMPTS = ("import os\n", "def main():\n    ", "class Config:\n    def __init__(self", "# ", "for i in range(")


DEFAULT_DRAFT_BLOCKS = (1, 2)
"""Block counts k tried below k = b for every candidate draft length b (`draft_shapes`)."""

def as_shape(candidate) -> tuple[int, int]:
    """(b, k) of a candidate, which is a draft length b (k = b, the paper's step) or a shape
    (b, k); AR is (0, 0). Raises ValueError naming a bad k."""
    if isinstance(candidate, int) and not isinstance(candidate, bool):
        return candidate, check_draft_shape(candidate)
    b, k = candidate
    return b, check_draft_shape(b, k)


def shape_name(candidate) -> str:
    """'ar', or 'b{b}k{k}' (the JSON key of a shape)."""
    b, k = as_shape(candidate)
    return "ar" if b == 0 else f"b{b}k{k}"


def query_tokens(candidate) -> int:
    """New query tokens per row of one step of the shape: b + k*b (1 for AR)."""
    return Layout.decode(*as_shape(candidate)).num_new


def draft_shapes(draft_lens, blocks=DEFAULT_DRAFT_BLOCKS) -> list[tuple[int, int]]:
    """Candidate shapes: for each draft length b, k = b and every k of `blocks` below it."""
    shapes = set()
    for b in draft_lens:
        shapes.add(as_shape(b))
        shapes.update((b, k) for k in blocks if 1 <= k < b)
    return sorted(shapes)


@dataclass
class DraftChoice:
    draft_len: int
    expected_tokens_per_step: dict
    step_seconds: dict
    """Both keyed by candidate (as given: draft lengths or (b, k) shapes)."""
    acceptance: list[float]
    """acceptance[i]: probability that drafts d_1..d_{i+1} are all accepted."""
    draft_blocks: int | None = None
    """k of the chosen shape (= draft_len when the candidate was a plain draft length)."""

    @property
    def shape(self) -> tuple[int, int]:
        return as_shape((self.draft_len, self.draft_blocks) if self.draft_blocks is not None else self.draft_len)

    @property
    def expected_tokens_per_second(self) -> dict:
        return {b: self.expected_tokens_per_step[b] / self.step_seconds[b] for b in self.step_seconds}


def shifted_acceptance(acceptance: list[float], shift: int, count: int) -> list[float]:
    """P(the first i of `count` proposals accepted), i = 0..count, for proposals that are masks
    shift+1.. of their block: P(d_1..d_{shift+i}) / P(d_1..d_shift), from `acceptance` measured
    at shift 0 (0 past a position that was never accepted)."""
    full = [1.0] + [float(p) for p in acceptance]
    base = full[shift] if shift < len(full) else 0.0
    return [1.0] + [full[shift + i] / base if base > 0 and shift + i < len(full) else 0.0
                    for i in range(1, count + 1)]


def expected_tokens(acceptance: list[float], draft_len: int, draft_blocks: int | None = None) -> float:
    """E[committed tokens per step] in the long run at shape (b, k) = (`draft_len`,
    `draft_blocks`; None: k = b; b = 0 and 1 commit exactly one), docs/design.md §3.4.

    A step's state is the shift s of its proposals: after a step that accepted j proposals they
    are masks s+1..b-1 of one block, s = 0 for j < k and j - k + 1 otherwise
    (`layout.next_proposals`), so b - 1 - s proposals. In state s the step accepts exactly j
    with P(first j accepted) - P(first j+1 accepted) (`shifted_acceptance`) and commits j + 1.
    The states form a Markov chain started at s = 0 (the prefill drafts a full block); the
    answer is sum_s pi_s * E[j + 1 | s] over its stationary distribution pi. With k = b every
    state is 0 and this is 1 + sum_{i=1}^{b-1} P(d_1..d_i all accepted)."""
    b, k = as_shape((draft_len, draft_blocks) if draft_blocks is not None else draft_len)
    if b <= 1:
        return 1.0
    states = b - k + 1  # shifts 0 .. b - k
    transition = numpy.zeros((states, states))
    reward = numpy.zeros(states)
    for s in range(states):
        count = b - 1 - s
        reach = shifted_acceptance(acceptance, s, count)
        for j in range(count + 1):
            p = reach[j] - (reach[j + 1] if j < count else 0.0)
            reward[s] += p * (j + 1)
            transition[s, b - 1 - next_proposals(j, b, k)[2]] += p
    # pi = pi P, sum(pi) = 1 (least squares: exact for the chain's one recurrent class from s = 0)
    system = numpy.vstack([transition.T - numpy.eye(states), numpy.ones(states)])
    target = numpy.zeros(states + 1)
    target[-1] = 1.0
    pi = numpy.linalg.lstsq(system, target, rcond=None)[0]
    return float(pi @ reward)


def expected_tokens_per_step(acceptance: list[float], candidate, replayed: dict | None = None) -> float:
    """The expected tokens per step of a candidate (draft length or (b, k)) given what was
    measured: its replayed tokens per step (`replayed`, keyed by `shape_name`; runtime/replay.py)
    when it has them, else the estimate from `acceptance` (`expected_tokens`)."""
    name = shape_name(candidate)
    if replayed and name in replayed:
        return float(replayed[name])
    return expected_tokens(acceptance, *as_shape(candidate))


def device_sync(output: torch.Tensor) -> None:
    """Wait for the device that computed `output` (CUDA kernels run asynchronously: without this
    the clock stops while the last layers may still be running)."""
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)


def measure_step_seconds(backend: Backend, draft_lens: list, batch: int = 1, past_len: int = 128,
                         repeats: int = 15) -> dict:
    """Median latency of one decode forward per candidate (draft length or (b, k) shape; keys as
    given), on a cache holding `past_len` tokens. The candidates are timed round-robin, so drift
    of the machine's speed during the measurement falls on all of them alike."""
    config = backend.config
    setups = {}
    for b in draft_lens:
        layout = Layout.decode(*as_shape(b))
        cache = backend.new_cache(batch, past_len + layout.num_new)
        cache.commit([past_len] * batch)
        tokens = torch.full((batch, layout.num_new), config.mask_token_id, dtype=torch.long)
        backend.forward(tokens, layout, cache)  # warm-up
        setups[b] = (tokens, layout, cache)
    times: dict = {b: [] for b in draft_lens}
    for _ in range(repeats):
        for b, (tokens, layout, cache) in setups.items():
            start = time.perf_counter()
            device_sync(backend.forward(tokens, layout, cache))
            times[b].append(time.perf_counter() - start)
    return {b: statistics.median(t) for b, t in times.items()}


def acceptance_from_stats(accepted_per_position: list[int], drafts) -> list[float]:
    """P(d_1..d_i all accepted) from the engine's counters (accepting stops at the first miss,
    so the count at position i is already the count of 'all of the first i accepted'). `drafts`:
    the steps that verified proposals, or per position the steps that had a proposal there
    (`Stats.proposed_per_position`; the same with k = b)."""
    proposed = drafts if isinstance(drafts, list) else [drafts] * len(accepted_per_position)
    return [count / n if n else 0.0 for count, n in zip(accepted_per_position, proposed)]


def load_acceptance(folder: str | Path, block_size: int) -> list[float] | None:
    path = Path(folder) / ACCEPTANCE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rates = data.get("acceptance")
    if not isinstance(rates, list) or len(rates) != block_size - 1:
        return None
    return [float(r) for r in rates]


def load_replayed(folder: str | Path, block_size: int) -> dict[str, float] | None:
    """The replayed tokens per step of acceptance.json (`REPLAY_FIELD`), the shapes of a model of
    `block_size` only; None when the file or the field (older files) is missing."""
    path = Path(folder) / ACCEPTANCE_FILE
    table = json.loads(path.read_text()).get(REPLAY_FIELD) if path.is_file() else None
    if not isinstance(table, dict):
        return None
    names = {shape_name(s) for s in draft_shapes(range(1, block_size + 1), range(1, block_size + 1))}
    return {name: float(value) for name, value in table.items()
            if name in names and isinstance(value, (int, float)) and not isinstance(value, bool)} or None


def calibrate_acceptance(backend: Backend, tokenizer, max_new_tokens: int = 48) -> list[float]:
    """Measure acceptance at the full block size by greedy generation from generic prompts."""
    from .generate import DecodeEngine, Request

    engine = DecodeEngine(backend, tokenizer, draft_len=backend.config.block_size)
    results = engine.generate([Request(tokenizer.encode(p), max_new_tokens) for p in CALIBRATION_PROMPTS])
    drafts = sum(r.stats.drafts for r in results)
    totals = [sum(col) for col in zip(*(r.stats.accepted_per_position for r in results))]
    return acceptance_from_stats(totals, drafts)


def measure_engine_step_seconds(backend: Backend, tokenizer, draft_lens: list, batch: int = 1,
                                past_len: int = 128, repeats: int = 5) -> dict:
    """Median latency of one whole `DecodeEngine.step` (forward, verification, drafting, stop
    checks and detokenization) per candidate (draft length or (b, k) shape; keys as given), for
    `batch` rows whose caches hold about `past_len` tokens: what a server pays per step,
    host-side work included. Candidates are timed round-robin on the same rows (`set_draft_len`
    between steps)."""
    from .generate import DecodeEngine, Request

    config = backend.config
    generator = torch.Generator().manual_seed(0)
    first_plain = max(config.mask_token_id, *config.eos_token_ids, 2) + 1
    prompts = torch.randint(first_plain, config.vocab_size, (batch, past_len), generator=generator).tolist()
    budget = repeats * (sum(max(as_shape(b)[0], 1) for b in draft_lens) + len(draft_lens)) + 2
    engine = DecodeEngine(backend, tokenizer, draft_len=max(as_shape(b)[0] for b in draft_lens))
    engine.add([Request(prompt, budget, eos_ids=()) for prompt in prompts])
    times: dict = {b: [] for b in draft_lens}
    for _ in range(repeats + 1):  # the first round warms up
        for b in draft_lens:
            engine.set_draft_len(*as_shape(b))
            start = time.perf_counter()
            engine.step()
            times[b].append(time.perf_counter() - start)
    return {b: statistics.median(t[1:]) for b, t in times.items()}


@dataclass
class BatchDraftPolicy:
    """The best draft shape for each batch size, from step latencies measured per batch size
    (a server's rows share one forward, so the query tokens of a step grow with the batch and the
    best shape shrinks: fewer drafts b, fewer blocks k; 0, plain AR, is a candidate)."""

    acceptance: list[float]
    step_seconds: dict[int, dict]
    """step_seconds[batch][candidate]: measured latency of one step of `batch` rows at a draft
    length b (k = b) or a shape (b, k)."""
    replayed: dict[str, float] | None = None
    """Replayed tokens per step by shape name (`load_replayed`); None: estimates from acceptance."""

    @classmethod
    def measure(cls, backend: Backend, acceptance: list[float], batch_sizes: list[int],
                draft_lens: list, repeats: int = 5, tokenizer=None,
                replayed: dict[str, float] | None = None) -> "BatchDraftPolicy":
        """Time whole engine steps (`measure_engine_step_seconds`) of every candidate (draft
        lengths or (b, k) shapes, e.g. `draft_shapes(...)`) for every batch size."""
        table = {batch: measure_engine_step_seconds(backend, tokenizer, draft_lens, batch=batch, repeats=repeats)
                 for batch in sorted(set(batch_sizes))}
        return cls(acceptance, table, replayed)

    def expected_tokens_per_step(self, candidate) -> float:
        """`expected_tokens_per_step` of `candidate` with this policy's measurements."""
        return expected_tokens_per_step(self.acceptance, candidate, self.replayed)

    def best(self, batch: int):
        """The candidate (as the table keys it) with the best expected tokens per second for
        `batch` rows, using the smallest measured batch size that holds them (the largest one
        beyond the table); `as_shape` of it is the (b, k) to use."""
        measured = sorted(self.step_seconds)
        size = next((m for m in measured if m >= batch), measured[-1])
        seconds = self.step_seconds[size]
        return max(sorted(seconds, key=as_shape), key=lambda c: self.expected_tokens_per_step(c) / seconds[c])

    def to_json(self) -> dict:
        """{"acceptance", "step_seconds": {batch: {"b,k": seconds}}, and REPLAY_FIELD when
        replayed} (`from_json` reads it back)."""
        data = {"acceptance": self.acceptance,
                "step_seconds": {str(batch): {",".join(map(str, as_shape(c))): seconds for c, seconds in row.items()}
                                 for batch, row in self.step_seconds.items()}}
        if self.replayed is not None:
            data[REPLAY_FIELD] = self.replayed
        return data

    @classmethod
    def from_json(cls, data: dict) -> "BatchDraftPolicy":
        """The policy `to_json` wrote (a key "b" alone is the draft length b, k = b; a cache
        written before replay has no REPLAY_FIELD: estimates from acceptance)."""
        def candidate(key: str):
            parts = tuple(int(v) for v in key.split(","))
            return parts[0] if len(parts) == 1 else parts
        return cls(data["acceptance"], {int(batch): {candidate(key): seconds for key, seconds in row.items()}
                                        for batch, row in data["step_seconds"].items()},
                   data.get(REPLAY_FIELD))


def choose_draft_len(backend: Backend, acceptance: list[float], batch: int = 1,
                     step_seconds: dict | None = None, candidates: list | None = None,
                     replayed: dict[str, float] | None = None) -> DraftChoice:
    """The candidate (draft lengths 0..block_size with k = b by default, AR included; or the
    given draft lengths / (b, k) shapes) with the best expected tokens per second
    (`expected_tokens_per_step` with `replayed` where it has the shape)."""
    candidates = list(candidates) if candidates is not None else list(range(0, backend.config.block_size + 1))
    step_seconds = step_seconds or measure_step_seconds(backend, candidates, batch=batch)
    expected = {c: expected_tokens_per_step(acceptance, c, replayed) for c in candidates}
    best = max(sorted(candidates, key=as_shape), key=lambda c: expected[c] / step_seconds[c])
    b, k = as_shape(best)
    return DraftChoice(b, expected, step_seconds, acceptance, k)

"""Choose the draft shape (b, k) by measurement: whole decode steps timed on this device and
backend, times the model's measured tokens per step (docs/design.md §3.4).

A candidate is a draft length b (k = b mask blocks, the paper's step) or a shape (b, k) with
k <= b blocks; (0, 0) and 0 are AR. Only the draft lengths the checkpoint was trained with are
candidates (`candidate_draft_lens`). A step costs latency(b, k, batch), which grows with its
b + k*b query tokens per row once they stop being "free". The best shape maximizes expected
tokens per step / latency (expected tokens per second).

The expected tokens per step of a shape (`expected_tokens_per_step`, the one definition) is
what was measured for it: the replayed tokens per step (runtime/replay.py: the engine's greedy
decode loop run on the host over prompts, exact for every (b, k)) when `acceptance.json` holds
them, else an estimate from acceptance (`expected_tokens`): with k = b a step commits
E[a | b] = 1 + sum_{i=1}^{b-1} P(d_1..d_i all accepted); with k < b a step after one that
committed a > k tokens has fewer proposals, and the long-run tokens per step is the stationary
expectation of that Markov chain, with P(first i accepted | shift s) = P(d_1..d_{s+i}) /
P(d_1..d_s) (optimistic: the shifted masks' block did not see the tokens before them).

Both come from `acceptance.json` beside the model (written by `tidar calibrate`,
runtime/calibrate.py, or `tidar bench --write-acceptance`); without it, a short greedy replay of
generic prompts estimates them (`calibrate_acceptance`).

The latency is measured as a race (`race`) of whole `DecodeEngine` steps (`EngineSteps`: the
forward, verification, drafting, stop checks and detokenization of a representative batch):
  1. candidates another one dominates (no more query tokens, no fewer expected tokens) are
     dropped untimed;
  2. the rest are screened in order of query tokens, one timed step each after a warm-up one; a
     candidate that could not win even if it cost 25 % less than the dearest cheaper candidate
     measured is dropped untimed (a step never costs less than one with fewer query tokens);
  3. the survivors are timed round-robin, in a shuffled order each round (drift of the machine's
     speed falls on all alike), until the confidence intervals of their rates separate the
     best from the rest, the intervals are narrower than the tie tolerance, a round limit or
     the time budget;
  4. `pick`: among the candidates tied with the best (its rate inside the best one's
     confidence interval or within `TIE_TOLERANCE` of it), the one with the fewest query tokens.
`tidar bench` checks the choice against measured tokens/s.

The drafter (docs/design.md §3.9: TiDAR's block alone, or the hybrid that may place an n-gram
continuation instead) is chosen after the shape, at that shape, by measured tokens/s
(`choose_drafter`, ties to TiDAR alone); `tidar bench` measures both.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy
import torch

from .backends.base import Backend
from .draft_shape import trained_block_sizes
from .layout import Layout, check_draft_shape, next_proposals

ACCEPTANCE_FILE = "acceptance.json"
REPLAY_FIELD = "replayed_tokens_per_step"
"""The field of acceptance.json with the replayed tokens per step, {"b{b}k{k}": tokens/step}."""

DEFAULT_DRAFT_BLOCKS = (1, 2)
"""Block counts k tried below k = b for every candidate draft length b (`draft_shapes`)."""
VERIFY_ONLY_LENS = (2, 3, 4, 6, 8)
"""Draft lengths v of the verify-only shapes (v, 0) a server weighs at every step (docs/design.md
§3.10): an n-gram continuation rarely holds past 7 proposals (`tidar bench`'s prompts), and each
length is a step shape to capture on GPUs."""
TIE_TOLERANCE = 0.02
"""Rates within this fraction of the best measured one are tied whatever the intervals say
(differences a machine does not reproduce from run to run); ties go to fewer query tokens."""
CONFIDENCE_Z = 1.96
"""Half-width of a median's confidence interval in standard errors (95 % for normal data)."""
SCREEN_MARGIN = 0.25
"""Screening drops a candidate whose rate at a step cost this much below its bound still loses."""
MEDIAN_SE = 1.4826 * 1.2533
"""MAD -> standard deviation (normal data), times the median's efficiency factor sqrt(pi / 2)."""


def as_shape(candidate) -> tuple[int, int]:
    """(b, k) of a candidate, which is a draft length b (k = b, the paper's step) or a shape
    (b, k); AR is (0, 0), a verify-only step (b, 0). Raises ValueError naming a bad k."""
    if isinstance(candidate, int) and not isinstance(candidate, bool):
        return candidate, check_draft_shape(candidate)
    b, k = candidate
    return b, check_draft_shape(b, k, verify_only=True)


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


def trained_draft_lens(config) -> tuple[int, ...]:
    """The draft lengths b > 0 the checkpoint was trained with (`draft_shape.trained_block_sizes`:
    its declared trained block sizes, else its block size alone)."""
    return trained_block_sizes(config)


def candidate_draft_lens(config, wanted=None) -> list[int]:
    """AR (0) and the draft lengths of `wanted` (None: every one) the checkpoint was trained with;
    when `wanted` names draft lengths but no trained one, the smallest trained one (drafting
    stays a candidate: the defaults name short drafts, a released model is trained on 16)."""
    trained = trained_draft_lens(config)
    wanted = list(trained if wanted is None else wanted)
    lens = {b for b in wanted if b in trained}
    if not lens and any(b > 0 for b in wanted):
        lens = {min(trained)}
    return [0] + sorted(lens)


@dataclass
class DraftChoice:
    draft_len: int
    expected_tokens_per_step: dict
    step_seconds: dict
    """Both keyed by candidate (as given: draft lengths or (b, k) shapes); step_seconds holds the
    timed candidates only (a race skips some untimed)."""
    acceptance: list[float]
    """acceptance[i]: probability that drafts d_1..d_{i+1} are all accepted."""
    draft_blocks: int | None = None
    """k of the chosen shape (= draft_len when the candidate was a plain draft length)."""
    race: "Race | None" = None
    """The measurement behind the choice (None when the step latencies were given)."""
    replayed: dict | None = None
    """The replayed tokens per step the expectations came from (None: from `acceptance`)."""
    batch: int = 1
    """The rows of the steps that were timed."""

    @property
    def shape(self) -> tuple[int, int]:
        return as_shape((self.draft_len, self.draft_blocks) if self.draft_blocks is not None else self.draft_len)

    @property
    def expected_tokens_per_second(self) -> dict:
        return {b: self.expected_tokens_per_step[b] / self.step_seconds[b] for b in self.step_seconds}

    @property
    def policy(self) -> "BatchDraftPolicy":
        """This choice as a one-batch-size policy (its `best` is `shape`), e.g. for an engine that
        weighs verify-only steps (`DecodeEngine(shape_policy=...)`, docs/design.md §3.10)."""
        intervals = None
        if self.race is not None:
            intervals = {self.batch: {c: (self.race.interval(c)[0], self.race.interval(c)[2])
                                      for c in self.race.samples}}
        return BatchDraftPolicy(self.acceptance, {self.batch: dict(self.step_seconds)}, self.replayed, intervals)


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
    state is 0 and this is 1 + sum_{i=1}^{b-1} P(d_1..d_i all accepted). A verify-only shape
    (k = 0) drafts nothing from the blocks: 1."""
    b, k = as_shape((draft_len, draft_blocks) if draft_blocks is not None else draft_len)
    if b <= 1 or k == 0:
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


# ------------------------------------------------------------------ timing
def device_sync(output: torch.Tensor) -> None:
    """Wait for the device that computed `output` (CUDA kernels run asynchronously: without this
    the clock stops while the last layers may still be running)."""
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)


def measure_step_seconds(backend: Backend, draft_lens: list, batch: int = 1, past_len: int = 128,
                         repeats: int = 15) -> dict:
    """Median latency of one bare decode forward per candidate (draft length or (b, k) shape;
    keys as given), on a cache holding `past_len` tokens, timed round-robin. A forward is not a
    step (the autotuner times whole steps, `EngineSteps`); benchmarks/step_latency.py splits a
    step into its forward and the rest with it."""
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


class EngineSteps:
    """Times one whole `DecodeEngine.step` (forward, verification, drafting, stop checks and
    detokenization: what a server pays per step) of `batch` rows at a candidate shape; calling it
    with a candidate runs one step at that shape and returns its seconds.

    The rows hold random prompts of `past_len` plain tokens (no [MASK], end or pad id) and
    generate `new_tokens` each without end ids; rows that finish are replaced by new ones before
    the next timed step (their prefill is not timed, `prefill_seconds` keeps it), so the cache
    stays between `past_len` and `past_len + new_tokens` tokens and its memory bounded."""

    def __init__(self, backend: Backend, tokenizer=None, batch: int = 1, past_len: int = 128,
                 new_tokens: int = 256, draft_len: int | None = None, seed: int = 0):
        from .generate import DecodeEngine

        config = backend.config
        self.batch, self.past_len, self.new_tokens = batch, past_len, new_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab = config.vocab_size if tokenizer is None else min(config.vocab_size, tokenizer.vocab_size)
        special = {config.mask_token_id, *config.eos_token_ids, config.pad_token_id}
        self.special = torch.tensor(sorted(t for t in special if t is not None), dtype=torch.long)
        self.plain = next(t for t in range(self.vocab) if t not in special)
        self.engine = DecodeEngine(backend, tokenizer, draft_len=config.block_size if draft_len is None else draft_len)
        self.prefill_seconds: list[float] = []
        """Seconds of each (untimed) prefill of new rows."""

    def _fill(self) -> None:
        from .generate import Request

        missing = self.batch - self.engine.batch_size
        prompts = torch.randint(0, self.vocab, (missing, self.past_len), generator=self.generator)
        prompts = torch.where(torch.isin(prompts, self.special), self.plain, prompts)
        start = time.perf_counter()
        self.engine.add([Request(prompt, self.new_tokens, eos_ids=()) for prompt in prompts.tolist()])
        self.prefill_seconds.append(time.perf_counter() - start)

    def __call__(self, candidate) -> float:
        if self.engine.batch_size < self.batch:
            self._fill()
        self.engine.set_draft_len(*as_shape(candidate))
        start = time.perf_counter()
        self.engine.step()  # returns after the committed tokens reached the host: the device is done
        return time.perf_counter() - start


def median_interval(samples, z: float = CONFIDENCE_Z) -> tuple[float, float, float]:
    """(low, median, high) of `samples`: the median and its confidence interval median +- z
    standard errors, the standard error estimated robustly as MEDIAN_SE * MAD / sqrt(n) (a
    preempted step among them barely moves it). One sample: an interval of zero width."""
    middle = statistics.median(samples)
    if len(samples) < 2:
        return middle, middle, middle
    mad = statistics.median(abs(x - middle) for x in samples)
    half = z * MEDIAN_SE * mad / math.sqrt(len(samples))
    return max(middle - half, 0.0), middle, middle + half


def pick(expected: dict, seconds: dict, intervals: dict | None = None, tie: float = TIE_TOLERANCE):
    """The candidate to use of those in `seconds` (median step seconds): of the candidates tied
    with the best rate (expected tokens per step / seconds) -- a rate inside the best one's
    confidence interval (from `intervals`, {candidate: (low, high) seconds}) or within `tie` of
    it -- the one with the fewest query tokens (then the faster, then the smaller shape)."""
    rate = {c: expected[c] / seconds[c] for c in seconds}
    leader = max(sorted(rate, key=as_shape), key=rate.get)
    floor = (1.0 - tie) * rate[leader]
    if intervals and leader in intervals:
        floor = min(floor, expected[leader] / intervals[leader][1])
    tied = [c for c in rate if rate[c] >= floor]
    return min(tied, key=lambda c: (query_tokens(c), -rate[c], as_shape(c)))


@dataclass
class Race:
    """What `race` measured and decided. Keys: the candidates as given."""

    expected: dict
    """Expected tokens per step of every candidate."""
    samples: dict = field(default_factory=dict)
    """Timed step seconds of every candidate that was timed (warm-up steps excluded)."""
    skipped: dict = field(default_factory=dict)
    """Candidates never timed, with the reason."""
    eliminated: dict = field(default_factory=dict)
    """Candidates dropped from the race because their rate interval fell below the best one's,
    with the round."""
    rounds: int = 0
    seconds: float = 0.0
    """Wall time of the whole race (warm-ups and refills included)."""
    stop: str = ""
    """Why the timing ended: "one left", "separated", "resolved", "max rounds" or "budget"."""
    tie: float = TIE_TOLERANCE
    z: float = CONFIDENCE_Z

    def interval(self, candidate) -> tuple[float, float, float]:
        return median_interval(self.samples[candidate], self.z)

    @property
    def step_seconds(self) -> dict:
        """Median step seconds of every timed candidate."""
        return {c: statistics.median(s) for c, s in self.samples.items()}

    def rate(self, candidate) -> tuple[float, float, float]:
        """(low, median, high) expected tokens per second of a timed candidate."""
        low, middle, high = self.interval(candidate)
        e = self.expected[candidate]
        return e / high, e / middle, (e / low if low > 0 else math.inf)

    @property
    def alive(self) -> list:
        """Timed candidates still in the race at its end."""
        return [c for c in self.samples if c not in self.eliminated]

    @property
    def best_measured(self):
        """The timed candidate with the best median rate."""
        rates = {c: self.rate(c)[1] for c in self.samples}
        return max(sorted(rates, key=as_shape), key=rates.get)

    @property
    def chosen(self):
        """`pick` among the candidates still in the race."""
        alive = self.alive
        return pick(self.expected, {c: statistics.median(self.samples[c]) for c in alive},
                    {c: (self.interval(c)[0], self.interval(c)[2]) for c in alive}, self.tie)

    def to_json(self) -> dict:
        """Per candidate name: timed samples, median ms and rate interval, or why it was skipped."""
        out = {}
        for c in self.expected:
            entry = {"expected_tokens_per_step": round(self.expected[c], 4)}
            if c in self.samples:
                low, middle, high = self.interval(c)
                entry.update(samples=len(self.samples[c]), step_ms=round(1000 * middle, 3),
                             step_ms_interval=[round(1000 * low, 3), round(1000 * high, 3)])
                if c in self.eliminated:
                    entry["eliminated_in_round"] = self.eliminated[c]
            else:
                entry["skipped"] = self.skipped.get(c, "")
            out[shape_name(c)] = entry
        return {"rounds": self.rounds, "seconds": round(self.seconds, 2), "stop": self.stop,
                "chosen": shape_name(self.chosen) if self.samples else None,
                "best_measured": shape_name(self.best_measured) if self.samples else None, "candidates": out}


def race(time_step: Callable[[object], float], candidates: list, expected: dict, min_rounds: int = 5,
         max_rounds: int = 40, budget_s: float | None = None, tie: float = TIE_TOLERANCE, z: float = CONFIDENCE_Z,
         progress: Callable[[str], None] | None = None, seed: int = 0, clock: Callable[[], float] = time.perf_counter,
         warmup: bool = True) -> Race:
    """Time `candidates` with `time_step(candidate) -> seconds` (e.g. `EngineSteps`) and decide
    among them (steps 1-4 of the module docstring); `expected`: tokens per step of each.
    `budget_s` bounds the wall time: screening skips what it cannot reach, a round stops where
    it is (every candidate screened before it ran out keeps its samples). `progress` gets one
    line per screened candidate and per round."""
    say = progress or (lambda _line: None)
    started = clock()
    result = Race({c: float(expected[c]) for c in candidates}, tie=tie, z=z)
    out_of_time = lambda: budget_s is not None and clock() - started >= budget_s  # noqa: E731
    cost = lambda c: (query_tokens(c), -result.expected[c])  # noqa: E731
    kept = []
    for c in candidates:
        better = [o for o in candidates if query_tokens(o) <= query_tokens(c)
                  and result.expected[o] >= result.expected[c] and cost(o) < cost(c)]
        if better:
            result.skipped[c] = f"dominated by {shape_name(min(better, key=cost))}"
        else:
            kept.append(c)
    for c in sorted(kept, key=lambda c: (query_tokens(c), as_shape(c))):
        if out_of_time() and result.samples:  # the cheapest is timed whatever the budget
            result.skipped[c] = "time budget spent"
            continue
        cheaper = [o for o in result.samples if query_tokens(o) <= query_tokens(c)]
        if cheaper:
            bound = max(statistics.median(result.samples[o]) for o in cheaper)
            best = max(result.expected[o] / statistics.median(s) for o, s in result.samples.items())
            if result.expected[c] / ((1.0 - SCREEN_MARGIN) * bound) < best:
                result.skipped[c] = (f"cannot win: at most {result.expected[c] / ((1.0 - SCREEN_MARGIN) * bound):.1f} "
                                     f"tokens/s, the best measured {best:.1f}")
                continue
        if warmup:
            time_step(c)
        result.samples[c] = [time_step(c)]
        say(f"{shape_name(c)}: {1000 * result.samples[c][0]:.1f} ms/step, "
            f"{result.expected[c] / result.samples[c][0]:.1f} expected tokens/s")
    result.rounds = 1
    alive, shuffle = list(result.samples), random.Random(seed)
    result.stop = "one left"
    while len(alive) > 1:
        if result.rounds >= max_rounds:
            result.stop = "max rounds"
            break
        if out_of_time():
            result.stop = "budget"
            break
        order = list(alive)
        shuffle.shuffle(order)
        for c in order:
            if out_of_time():
                break
            result.samples[c].append(time_step(c))
        result.rounds += 1
        if result.rounds < min_rounds:
            continue
        rates = {c: result.rate(c) for c in alive}
        leader = max(sorted(alive, key=as_shape), key=lambda c: rates[c][1])
        for c in alive:  # out: surely slower, and by more than a tie
            if c != leader and rates[c][2] < rates[leader][0] and rates[c][1] < (1.0 - tie) * rates[leader][1]:
                result.eliminated[c] = result.rounds
        alive = [c for c in alive if c not in result.eliminated]
        say(f"round {result.rounds}: {len(alive)} in the race, leading {shape_name(leader)} "
            f"{rates[leader][1]:.1f} tokens/s [{rates[leader][0]:.1f}, {rates[leader][2]:.1f}]")
        if len(alive) == 1:
            result.stop = "separated"
            break
        if all((rates[c][2] - rates[c][0]) / (2 * rates[c][1]) <= tie / 2 for c in alive):
            result.stop = "resolved"
            break
    result.seconds = clock() - started
    return result


def race_engine_steps(backend: Backend, tokenizer, candidates: list, expected: dict, batch: int = 1,
                      past_len: int = 128, **options) -> Race:
    """`race` of whole engine steps of `batch` rows (`EngineSteps`); `options` go to `race`."""
    longest = max(as_shape(c)[0] for c in candidates)
    steps = EngineSteps(backend, tokenizer, batch=batch, past_len=past_len, draft_len=longest)
    return race(steps, candidates, expected, **options)


def measure_engine_step_seconds(backend: Backend, tokenizer, draft_lens: list, batch: int = 1,
                                past_len: int = 128, repeats: int = 5) -> dict:
    """Median latency of one whole `DecodeEngine.step` per candidate (draft length or (b, k)
    shape; keys as given) for `batch` rows: `repeats` timed steps each, round-robin, after one
    warm-up step each (every candidate timed; the autotuner races them instead, `race`)."""
    steps = EngineSteps(backend, tokenizer, batch=batch, past_len=past_len,
                        draft_len=max(as_shape(b)[0] for b in draft_lens))
    times: dict = {b: [] for b in draft_lens}
    for round_ in range(repeats + 1):  # the first round warms up
        for b in draft_lens:
            seconds = steps(b)
            if round_:
                times[b].append(seconds)
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


@dataclass
class BatchDraftPolicy:
    """The best draft shape for each batch size, from step latencies measured per batch size
    (a server's rows share one forward, so the query tokens of a step grow with the batch and the
    best shape shrinks: fewer drafts b, fewer blocks k; 0, plain AR, is a candidate)."""

    acceptance: list[float]
    step_seconds: dict[int, dict]
    """step_seconds[batch][candidate]: measured (median) latency of one step of `batch` rows at a
    draft length b (k = b) or a shape (b, k); the candidates a race skipped are absent."""
    replayed: dict[str, float] | None = None
    """Replayed tokens per step by shape name (`load_replayed`); None: estimates from acceptance."""
    intervals: dict[int, dict] | None = None
    """intervals[batch][candidate]: (low, high) confidence interval of that median (`race`);
    None (a policy written before races, or given by hand): ties within `TIE_TOLERANCE` only."""
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Values a decode loop asks at every step, computed once: the measurements are fixed."""

    @classmethod
    def measure(cls, backend: Backend, acceptance: list[float], batch_sizes: list[int],
                draft_lens: list, repeats: int = 5, tokenizer=None,
                replayed: dict[str, float] | None = None, budget_s: float | None = None,
                progress: Callable[[str], None] | None = None, past_len: int = 128) -> "BatchDraftPolicy":
        """`race` whole engine steps (`EngineSteps`) of the candidates (draft lengths or (b, k)
        shapes, e.g. `draft_shapes(...)`) for each batch size, smallest first, at least `repeats`
        rounds each. With `budget_s` the batch sizes share the seconds left, and a batch size
        whose screening alone would not fit (estimated from the last one measured, scaled by the
        rows) is not measured: it and larger ones use the largest measured batch size's table."""
        say = progress or (lambda _line: None)
        expected = {c: expected_tokens_per_step(acceptance, c, replayed) for c in draft_lens}
        longest = max(as_shape(c)[0] for c in draft_lens)
        started = time.perf_counter()
        table, intervals, sizes = {}, {}, sorted(set(batch_sizes))
        last = None  # (batch, EngineSteps, Race) of the last measured batch size
        for index, batch in enumerate(sizes):
            left = None if budget_s is None else budget_s - (time.perf_counter() - started)
            if last is not None and left is not None:
                rows, steps, done = last
                scale = batch / rows
                estimate = scale * (statistics.median(steps.prefill_seconds) +
                                    2 * sum(statistics.median(s) for s in done.samples.values()))
                if estimate > left:
                    say(f"batch {batch} and larger not measured: about {estimate:.0f} s to screen, "
                        f"{max(left, 0):.0f} s of the budget left (they use batch {rows}'s table)")
                    break
            say(f"batch {batch}: timing {len(draft_lens)} candidate shapes")
            steps = EngineSteps(backend, tokenizer, batch=batch, past_len=past_len, draft_len=longest)
            share = None if left is None else left / (len(sizes) - index)
            done = race(steps, list(draft_lens), expected, min_rounds=repeats, max_rounds=max(repeats, 40),
                        budget_s=share, progress=lambda line, b=batch: say(f"batch {b}: {line}"))
            table[batch] = done.step_seconds
            intervals[batch] = {c: (done.interval(c)[0], done.interval(c)[2]) for c in done.samples}
            say(f"batch {batch}: {shape_name(done.chosen)} after {done.rounds} rounds, {done.seconds:.1f} s "
                f"({done.stop})")
            last = (batch, steps, done)
        return cls(acceptance, table, replayed, intervals)

    def _remember(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def expected_tokens_per_step(self, candidate) -> float:
        """`expected_tokens_per_step` of `candidate` with this policy's measurements."""
        return self._remember(("expected", as_shape(candidate)),
                              lambda: expected_tokens_per_step(self.acceptance, candidate, self.replayed))

    def best(self, batch: int, overhead: float = 0.0):
        """The candidate (as the table keys it) to use for `batch` rows (`pick`: the fewest query
        tokens among those tied with the best expected tokens per second), from the smallest
        measured batch size that holds them (the largest one beyond the table); `as_shape` of it
        is the (b, k) to use. `overhead`: seconds every step costs beyond the engine's step (a
        server's, measured as it serves: docs/design.md §3.10), added to each candidate's."""
        measured = sorted(self.step_seconds)
        size = next((m for m in measured if m >= batch), measured[-1])

        def choose():
            seconds = {c: s + overhead for c, s in self.step_seconds[size].items()}
            intervals = (self.intervals or {}).get(size)
            if intervals is not None and overhead:
                intervals = {c: (low + overhead, high + overhead) for c, (low, high) in intervals.items()}
            return pick({c: self.expected_tokens_per_step(c) for c in seconds}, seconds, intervals)
        return self._remember(("best", size, overhead), choose)

    def best_shape(self, batch: int, overhead: float = 0.0) -> tuple[int, int]:
        """`as_shape` of `best`."""
        return as_shape(self.best(batch, overhead))

    def step_seconds_at(self, batch: int, candidate) -> float:
        """Seconds of one step of `candidate` at `batch` rows: the table's (the smallest measured
        batch size that holds them, as `best`), or for a shape it does not hold (a verify-only
        (b, 0), which start-up does not race) `interpolate_seconds` over its shapes' query tokens."""
        measured = sorted(self.step_seconds)
        size = next((m for m in measured if m >= batch), measured[-1])
        shape = as_shape(candidate)

        def lookup() -> float:
            table = self.step_seconds[size]
            for key, seconds in table.items():
                if as_shape(key) == shape:
                    return seconds
            return interpolate_seconds(table, query_tokens(shape))
        return self._remember(("seconds", size, shape), lookup)

    def with_verify_only(self, batch: int, shape, outlook: list[list[float]],
                         lens: tuple[int, ...] = VERIFY_ONLY_LENS, overhead: float = 0.0) -> tuple[int, int]:
        """`shape` (this policy's pick for `batch` rows) or a verify-only shape (v, 0), v in `lens`,
        whichever commits the most tokens per second given the rows' n-gram `outlook`
        (`DecodeEngine.ngram_outlook`: per row, expected accepted n-gram proposals by count;
        docs/design.md §3.10). At `shape` (b, k) a row commits 1 + the larger of its n-gram's
        expected at b - 1 proposals and TiDAR's (`expected_tokens_per_step` - 1: in the long run,
        its block drafts every step); at (v, 0), 1 + its n-gram's at v - 1. Each shape's seconds are
        its `step_seconds_at` plus `overhead` (as in `best`). Ties keep `shape`."""
        b, k = as_shape(shape)
        if not outlook:
            return b, k

        def ngram(row: list[float], count: int) -> float:
            return row[min(count, len(row) - 1)] if count > 0 else 0.0

        tidar = self.expected_tokens_per_step((b, k)) - 1.0
        best = (b, k)
        best_rate = sum(1.0 + max(ngram(row, b - 1), tidar) for row in outlook) / (
            self.step_seconds_at(batch, best) + overhead)
        for v in lens:
            if not 2 <= v <= len(outlook[0]):
                continue
            rate = sum(1.0 + ngram(row, v - 1) for row in outlook) / (self.step_seconds_at(batch, (v, 0)) + overhead)
            if rate > best_rate:
                best, best_rate = (v, 0), rate
        return best

    def to_json(self) -> dict:
        """{"acceptance", "step_seconds": {batch: {"b,k": seconds}}, "step_seconds_interval" (same
        keys, [low, high]) when measured by a race, and REPLAY_FIELD when replayed} (`from_json`
        reads it back)."""
        key = lambda c: ",".join(map(str, as_shape(c)))  # noqa: E731
        data = {"acceptance": self.acceptance,
                "step_seconds": {str(batch): {key(c): seconds for c, seconds in row.items()}
                                 for batch, row in self.step_seconds.items()}}
        if self.intervals is not None:
            data["step_seconds_interval"] = {str(batch): {key(c): list(bounds) for c, bounds in row.items()}
                                             for batch, row in self.intervals.items()}
        if self.replayed is not None:
            data[REPLAY_FIELD] = self.replayed
        return data

    @classmethod
    def from_json(cls, data: dict) -> "BatchDraftPolicy":
        """The policy `to_json` wrote (a key "b" alone is the draft length b, k = b; a cache
        written before replay has no REPLAY_FIELD: estimates from acceptance; one written before
        races has no intervals)."""
        def candidate(key: str):
            parts = tuple(int(v) for v in key.split(","))
            return parts[0] if len(parts) == 1 else parts

        def table(field_name: str, value=lambda v: v):
            return {int(batch): {candidate(key): value(v) for key, v in row.items()}
                    for batch, row in data[field_name].items()}
        return cls(data["acceptance"], table("step_seconds"), data.get(REPLAY_FIELD),
                   table("step_seconds_interval", tuple) if "step_seconds_interval" in data else None)


def interpolate_seconds(seconds: dict, tokens: int) -> float:
    """Step seconds at `tokens` query tokens per row from measured {candidate: seconds} of other
    shapes at the same batch size: linear in query tokens between the two nearest measured
    token counts (a count measured twice: the faster), along the last two beyond them, and in
    proportion to the tokens with one. Step time at a batch size is close to linear in the query
    tokens once they fill the device (docs/design.md §3.10)."""
    points: dict[int, float] = {}
    for candidate, value in seconds.items():
        q = query_tokens(candidate)
        points[q] = min(value, points.get(q, value))
    xs = sorted(points)
    if not xs:
        raise ValueError("interpolate_seconds needs at least one measured shape")
    if tokens in points:
        return points[tokens]
    if len(xs) == 1:
        return points[xs[0]] * tokens / xs[0]
    right = next((i for i, x in enumerate(xs) if x > tokens), len(xs) - 1)
    right = min(max(right, 1), len(xs) - 1)
    x0, x1 = xs[right - 1], xs[right]
    value = points[x0] + (points[x1] - points[x0]) * (tokens - x0) / (x1 - x0)
    return value if value > 0 else points[x0]


def choose_draft_len(backend: Backend, acceptance: list[float], batch: int = 1,
                     step_seconds: dict | None = None, candidates: list | None = None,
                     replayed: dict[str, float] | None = None, tokenizer=None, budget_s: float | None = None,
                     min_rounds: int = 5, progress: Callable[[str], None] | None = None) -> DraftChoice:
    """The candidate (by default every shape of `draft_shapes(candidate_draft_lens(config))`, AR
    included; or the given draft lengths / (b, k) shapes) to use at `batch` rows: `pick` over
    `step_seconds` when given, else over a `race` of whole engine steps (`race_engine_steps`),
    with `expected_tokens_per_step` (the replay where `replayed` has the shape)."""
    if candidates is None:
        candidates = draft_shapes(candidate_draft_lens(backend.config))
    candidates = list(candidates)
    expected = {c: expected_tokens_per_step(acceptance, c, replayed) for c in candidates}
    measured = None
    if step_seconds is None:
        measured = race_engine_steps(backend, tokenizer, candidates, expected, batch=batch, min_rounds=min_rounds,
                                     budget_s=budget_s, progress=progress)
        best, step_seconds = measured.chosen, measured.step_seconds
    else:
        best = pick(expected, {c: step_seconds[c] for c in candidates})
    b, k = as_shape(best)
    return DraftChoice(b, expected, step_seconds, acceptance, k, measured, replayed, batch)


def choose_drafter(tokens_per_second: dict[str, float], tie: float = TIE_TOLERANCE) -> str:
    """The drafter (docs/design.md §3.9: "tidar", "hybrid", "ngram") to use at the chosen draft
    shape, from each one's measured tokens/s there: the fastest, except that a drafter within `tie`
    of it is tied, and a tie goes to "tidar" (no n-gram lookups on the host)."""
    if not tokens_per_second:
        raise ValueError("choose_drafter needs the measured tokens/s of at least one drafter")
    best = max(tokens_per_second.values())
    tied = [name for name, rate in tokens_per_second.items() if rate >= (1.0 - tie) * best]
    return "tidar" if "tidar" in tied else max(tied, key=tokens_per_second.get)

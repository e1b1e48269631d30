"""The autotuner's race of whole decode steps (runtime/autotune.py, docs/design.md §3.4).

The decision is checked against a timer whose true latencies are known (the oracle): step
seconds drawn around a true mean with a fixed seed, sometimes with a preempted step ten times
slower. The race must pick the truly fastest candidate when it is clearly faster, the one with
fewer query tokens when two are within noise, never time a dominated candidate, leave
untimed an expensive one that cannot win, stop at its time budget (the cheapest candidate timed
whatever the budget), and keep its decision through the server's policy JSON. The real
`EngineSteps` is checked on a tiny checkpoint: whole engine steps, refilled rows, a bounded cache.
No assertion is about how fast anything runs.
"""

from __future__ import annotations

import json
import random
import statistics
from types import SimpleNamespace

import pytest

from tidar.runtime import autotune
from tidar.runtime.autotune import BatchDraftPolicy, EngineSteps, as_shape, median_interval, pick, query_tokens, race


class NoisyTimer:
    """Step seconds of each candidate: true mean x (1 + 3 % gaussian noise), and every
    `outlier_every`-th call ten times the mean (a preempted step). Counts the calls."""

    def __init__(self, means: dict, seed: int = 0, outlier_every: int | None = None):
        self.means, self.random, self.outlier_every = means, random.Random(seed), outlier_every
        self.calls: dict = {c: 0 for c in means}

    def __call__(self, candidate) -> float:
        self.calls[candidate] += 1
        if self.outlier_every and sum(self.calls.values()) % self.outlier_every == 0:
            return 10 * self.means[candidate]
        return self.means[candidate] * (1 + 0.03 * self.random.gauss(0, 1))


def test_median_interval_covers_the_true_median():
    generator = random.Random(1)
    covered = 0
    for _ in range(400):
        samples = [generator.gauss(10.0, 1.0) for _ in range(15)]
        low, middle, high = median_interval(samples)
        assert low <= middle <= high
        covered += low <= 10.0 <= high
    assert 0.88 <= covered / 400 <= 0.995  # a 95 % interval, estimated robustly
    assert median_interval([2.0]) == (2.0, 2.0, 2.0)


def test_pick_breaks_ties_toward_fewer_query_tokens():
    expected = {(0, 0): 1.0, (4, 1): 2.0, (3, 3): 2.2}
    # (3, 3) is 1 % faster than (4, 1) but needs 12 query tokens to its 8: a tie
    seconds = {(0, 0): 1.0, (4, 1): 2.0 / 1.50, (3, 3): 2.2 / 1.515}
    assert pick(expected, seconds) == (4, 1)
    # 10 % apart and measured precisely: not a tie
    seconds[(3, 3)] = 2.2 / 1.65
    narrow = {c: (s * 0.995, s * 1.005) for c, s in seconds.items()}
    assert pick(expected, seconds, narrow) == (3, 3)
    # the same medians with the leader's interval reaching below (4, 1): within noise
    wide = {**narrow, (3, 3): (seconds[(3, 3)] * 0.8, seconds[(3, 3)] * 1.2)}
    assert pick(expected, seconds, wide) == (4, 1)


def test_race_picks_the_fastest_and_drops_the_hopeless_untimed():
    expected = {(0, 0): 1.0, (1, 1): 1.0, (4, 1): 2.0, (4, 2): 2.3, (3, 3): 2.2, (8, 1): 2.4, (16, 16): 3.0}
    means = {(0, 0): 0.010, (1, 1): 0.011, (4, 1): 0.011, (4, 2): 0.014, (3, 3): 0.016, (8, 1): 0.05,
             (16, 16): 0.200}
    # (16, 16) cannot win: costing at least (8, 1)'s 50 ms less 25 %, it makes at most 80 tokens/s
    timer = NoisyTimer(means, outlier_every=17)
    result = race(timer, list(expected), expected, progress=lambda line: None)
    assert result.chosen == (4, 1) and result.best_measured == (4, 1)  # 181.8 tokens/s, next (4, 2) 164.3
    assert timer.calls[(1, 1)] == 0 and result.skipped[(1, 1)].startswith("dominated by ar")
    assert timer.calls[(16, 16)] == 0 and result.skipped[(16, 16)].startswith("cannot win")
    assert result.stop in ("separated", "resolved") and set(result.eliminated) <= {(0, 0), (4, 2), (3, 3), (8, 1)}
    data = result.to_json()
    assert data["chosen"] == "b4k1" and data["candidates"]["b16k16"]["skipped"].startswith("cannot win")
    assert data["candidates"]["b4k1"]["samples"] == len(result.samples[(4, 1)]) >= 5


def test_race_resolves_a_near_tie_toward_fewer_query_tokens():
    expected = {(0, 0): 1.0, (4, 1): 2.0, (3, 3): 2.2}
    means = {(0, 0): 0.010, (4, 1): 2.0 / 150.0, (3, 3): 2.2 / 151.0}  # (3, 3) 0.7 % faster
    for seed in range(3):
        result = race(NoisyTimer(means, seed=seed), list(expected), expected)
        assert result.chosen == (4, 1), (seed, result.to_json())
        assert query_tokens(result.chosen) < query_tokens((3, 3))


def test_race_stops_at_its_budget_and_times_the_cheapest():
    now = [0.0]

    def timer(candidate):  # each step advances a fake clock by its cost
        now[0] += {(0, 0): 1.0, (4, 1): 1.5, (4, 4): 3.0}[candidate]
        return now[0] and {(0, 0): 1.0, (4, 1): 1.5, (4, 4): 3.0}[candidate]

    expected = {(0, 0): 1.0, (4, 1): 2.0, (4, 4): 2.9}
    result = race(timer, list(expected), expected, budget_s=0.5, clock=lambda: now[0])
    assert list(result.samples) == [(0, 0)] and result.chosen == (0, 0)
    assert result.skipped == {(4, 1): "time budget spent", (4, 4): "time budget spent"}
    now[0] = 0.0
    result = race(timer, list(expected), expected, budget_s=20.0, clock=lambda: now[0])
    assert result.stop == "budget" and now[0] < 20.0 + 3 * 2 * 3.0  # at most one more step each


def test_policy_races_batch_sizes_within_the_budget_and_round_trips(monkeypatch):
    """A batch size whose screening would not fit the budget left is not measured; the policy's
    JSON keeps medians and intervals, and the old format (medians only) still loads."""
    made = []

    class Steps:
        def __init__(self, backend, tokenizer, batch=1, past_len=128, draft_len=None, **_):
            self.batch, self.prefill_seconds = batch, [0.5 * batch]
            self.timer = NoisyTimer({c: 0.01 * batch * query_tokens(c) ** 0.5 for c in SHAPES})
            made.append(batch)

        def __call__(self, candidate):
            return self.timer(candidate)

    SHAPES = [(0, 0), (2, 1), (4, 1)]
    monkeypatch.setattr(autotune, "EngineSteps", Steps)
    acceptance = [0.8, 0.6, 0.4]
    policy = BatchDraftPolicy.measure(None, acceptance, [1, 64], SHAPES, repeats=5, budget_s=10.0)
    assert made == [1] and list(policy.step_seconds) == [1]  # batch 64: 32 s of prefill alone
    assert policy.best(64) == policy.best(1)
    again = BatchDraftPolicy.from_json(json.loads(json.dumps(policy.to_json())))
    assert again == policy and again.intervals[1].keys() == policy.step_seconds[1].keys()
    old = {"acceptance": acceptance, "step_seconds": {"1": {"0,0": 1.0, "4,1": 0.9}}}
    assert BatchDraftPolicy.from_json(old).intervals is None and as_shape(BatchDraftPolicy.from_json(old).best(1)) == (4, 1)


def test_candidates_are_the_trained_draft_lengths():
    every = SimpleNamespace(block_size=16, trained_block_sizes=tuple(range(1, 17)))
    assert autotune.candidate_draft_lens(every, (0, 1, 2, 3, 4)) == [0, 1, 2, 3, 4]
    released = SimpleNamespace(block_size=16, trained_block_sizes=(16,))
    assert autotune.candidate_draft_lens(released, (0, 1, 2, 3, 4)) == [0, 16]  # the smallest trained one
    assert autotune.candidate_draft_lens(released, (0,)) == [0]  # AR asked for alone
    assert autotune.candidate_draft_lens(released) == [0, 16]
    undeclared = SimpleNamespace(block_size=8)  # no field: the block size alone (runtime/draft_shape.py)
    assert autotune.candidate_draft_lens(undeclared, (0, 1, 2, 3, 4)) == [0, 8]


def test_engine_steps_time_whole_steps_and_refill_rows(tiny_backends, tiny_checkpoints):
    from tidar.runtime.tokenizer import Tokenizer

    backend = tiny_backends["qwen2"]
    steps = EngineSteps(backend, Tokenizer(tiny_checkpoints["qwen2"]), batch=3, past_len=20, new_tokens=6,
                        draft_len=4)
    seconds = [steps(shape) for shape in [(0, 0), (4, 1), (4, 4)] * 6]
    assert all(s > 0 for s in seconds)
    assert len(steps.prefill_seconds) >= 2  # rows of 6 tokens finished and were replaced
    assert steps.engine.batch_size == 3 and max(steps.engine.cache.lengths) <= 20 + 6 + 4
    assert (steps.engine.draft_len, steps.engine.draft_blocks) == (4, 4)
    ids = [t for row in steps.engine.rows for t in row.prompt_ids]
    config = backend.config
    assert config.mask_token_id not in ids and not set(config.eos_token_ids) & set(ids)
    result = autotune.race_engine_steps(backend, None, [(0, 0), (2, 1), (4, 1)],
                                        {(0, 0): 1.0, (2, 1): 1.5, (4, 1): 1.9}, past_len=16, min_rounds=3,
                                        max_rounds=4)
    assert set(result.samples) <= {(0, 0), (2, 1), (4, 1)} and (0, 0) in result.samples
    assert result.chosen in result.samples and statistics.median(result.samples[result.chosen]) > 0

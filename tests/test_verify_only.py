"""Verify-only steps (docs/design.md §3.10): a step of shape (v, 0) verifies the rows' pending
proposals (an n-gram continuation, or what TiDAR drafted last step) with v query tokens per row
and drafts nothing; a server weighs them against its policy's shape at every step.

What is tested
- Greedy output of the bundled model equals transformers' greedy generation while the engine
  cycles through verify-only, TiDAR and AR shapes step by step (rows of repeating and distinct
  prompts in one batch), and verify-only steps did verify n-gram proposals and accept some.
- Seeded sampling at T = 0.8 gives the same text as AR decoding through the same cycle.
- A verify-only step leaves no TiDAR proposals behind; `ngram_outlook` is each row's n-gram
  estimate over its candidate (zeros without one), and rows keep candidates in AR steps.
- The policy: step seconds of an unmeasured shape interpolated in query tokens, checked on
  written-out numbers; `with_verify_only` against a hand-computed valuation.
- The scheduler with a policy that makes verify-only steps pay takes them on repeating text, its
  served output still equals transformers', and with `verify_only` off (or the drafter tidar) it
  never takes one; the serving option parses and renders.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tidar.runtime.autotune import BatchDraftPolicy, interpolate_seconds
from tidar.runtime.generate import DecodeEngine, Request, RequestError
from tidar.runtime.sampling import SamplingParams

from test_hybrid_drafts import NEW_TOKENS, assert_counters_add_up, bundled, transformers_greedy  # noqa: F401

CYCLE = [(4, 0), (4, 1), (8, 0), (0, 0), (2, 0), (16, 16), (3, 0), (3, 0), (8, 2)]
"""Shapes set before successive steps (then repeated): verify-only between every other kind."""


def cycled(engine: DecodeEngine, requests: list[Request], record=None) -> list:
    results = [d.result for d in engine.add(requests) if d.finished]
    step = 0
    while engine.rows:
        shape = CYCLE[step % len(CYCLE)]
        engine.set_draft_len(*shape)
        deltas = engine.step()
        if record is not None:
            record(shape, deltas, engine)
        results += [d.result for d in deltas if d.finished]
        step += 1
    return results


def test_greedy_output_equals_transformers_through_verify_only_steps(bundled, transformers_greedy):  # noqa: F811
    backend, tokenizer, prompts = bundled
    engine = DecodeEngine(backend, tokenizer, draft_len=4, drafter="hybrid", verify_only=True)
    verified = {"proposed": 0, "accepted": 0}

    def record(shape, deltas, engine):
        if shape[1] == 0 and shape[0] > 0:
            for delta in deltas:
                verified["proposed"] += delta.step_stats.proposed_by_source.get("ngram", 0)
                verified["accepted"] += delta.step_stats.accepted_by_source.get("ngram", 0)
            # nothing drafted: every pending proposal is an n-gram's (or none)
            assert all(row.proposal_source == "ngram" or row.proposal_count == 0 for row in engine.rows)

    results = cycled(engine, [Request(p, NEW_TOKENS, eos_ids=()) for p in prompts], record)
    results.sort(key=lambda r: prompts.index(r.prompt_ids))
    assert [r.token_ids for r in results] == transformers_greedy
    for result in results:
        assert_counters_add_up(result.stats)
    assert 0 < verified["accepted"] <= verified["proposed"]


def test_seeded_sampling_is_the_same_text_through_verify_only_steps(bundled):  # noqa: F811
    backend, tokenizer, prompts = bundled
    sampling = [SamplingParams(temperature=0.8, seed=4321 + i) for i in range(len(prompts))]
    requests = [Request(p, NEW_TOKENS, sampling=s, eos_ids=()) for p, s in zip(prompts, sampling)]
    reference = [r.token_ids for r in DecodeEngine(backend, tokenizer, draft_len=0).generate(requests)]
    engine = DecodeEngine(backend, tokenizer, draft_len=4, drafter="hybrid", verify_only=True)
    results = cycled(engine, requests)
    results.sort(key=lambda r: [q.prompt_ids for q in requests].index(r.prompt_ids))
    assert [r.token_ids for r in results] == reference
    assert sum(r.stats.accepted_by_source.get("ngram", 0) for r in results) > 0


def test_outlook_is_each_rows_ngram_estimate_and_ar_steps_keep_candidates(bundled):  # noqa: F811
    backend, tokenizer, prompts = bundled
    engine = DecodeEngine(backend, tokenizer, draft_len=0, drafter="hybrid", verify_only=True)
    engine.add([Request(p, NEW_TOKENS, eos_ids=()) for p in prompts])
    block, with_candidate = backend.config.block_size, 0
    for _ in range(16):  # AR steps: nothing is placed, the candidates are kept and scored
        engine.step()
        outlook = engine.ngram_outlook()
        assert len(outlook) == len(engine.rows) and all(len(curve) == block for curve in outlook)
        for row, curve in zip(engine.rows, outlook):
            candidate = row.candidates.get("ngram", ())
            if not candidate:
                assert curve == [0.0] * block
                continue
            with_candidate += 1
            expected = row.estimates["ngram"].expected_curve(len(candidate))
            assert curve[: len(expected)] == expected and set(curve[len(expected):]) <= {expected[-1]}
    assert with_candidate > 0
    assert sum(sum(row.estimates["ngram"].at_risk) for row in engine.rows) > 0  # AR steps scored them


def test_verify_only_needs_a_drafter_that_proposes_ngrams(bundled):  # noqa: F811
    backend, _, _ = bundled
    with pytest.raises(RequestError, match="verify-only steps verify n-gram proposals: they need drafter hybrid"):
        DecodeEngine(backend, draft_len=4, drafter="tidar", verify_only=True)
    engine = DecodeEngine(backend, draft_len=4, drafter="tidar")
    with pytest.raises(RequestError, match=r"draft_blocks must be in \[1, draft_len = 4\], got 0"):
        engine.set_draft_len(4, 0)
    DecodeEngine(backend, draft_len=4, drafter="hybrid").set_draft_len(4, 0)  # a caller's choice


# ---------------------------------------------------------------------------- the policy
def test_unmeasured_step_seconds_are_interpolated_in_query_tokens():
    measured = {0: 1.0, (2, 1): 2.0, (4, 1): 3.0, (3, 1): 2.4}  # 1, 4, 8 and 6 query tokens per row
    assert interpolate_seconds(measured, 4) == 2.0
    assert interpolate_seconds(measured, 2) == pytest.approx(1.0 + 1.0 / 3.0)
    assert interpolate_seconds(measured, 7) == pytest.approx(2.7)
    assert interpolate_seconds(measured, 12) == pytest.approx(3.0 + 0.3 * 4)  # along 6 -> 8
    assert interpolate_seconds({(2, 1): 2.0}, 2) == pytest.approx(1.0)  # one point: in proportion
    assert interpolate_seconds({(2, 1): 2.0, (1, 1): 3.0, 0: 1.0}, 4) == 2.0
    assert interpolate_seconds({(1, 1): 1.5, 0: 1.0, (2, 1): 2.0}, 2) == 1.5  # 2 query tokens: (1, 1)
    with pytest.raises(ValueError, match="at least one measured shape"):
        interpolate_seconds({}, 3)


def test_with_verify_only_values_rows_as_written_out():
    """Batch 2, AR 0.004 s, (2, 1) at 4 query tokens 0.005 s (the policy's pick): (v, 0) costs
    0.004 + (v - 1) * 0.001 / 3 s. TiDAR's (2, 1) commits 4/3 tokens per step in the long run
    (its one proposal is accepted half the time, and a step after an accepted one has none)."""
    policy = BatchDraftPolicy([0.5] + [0.0] * 14, {2: {0: 0.004, (2, 1): 0.005}})
    assert policy.expected_tokens_per_step((2, 1)) == pytest.approx(4 / 3)
    tidar = 1 / 3
    base = (2, 1)
    assert policy.best(2) == base
    cost = lambda v: 0.004 + (v - 1) * 0.001 / 3  # noqa: E731
    assert policy.step_seconds_at(2, (4, 0)) == pytest.approx(cost(4))

    # no n-gram candidates: the shape, whatever verify-only costs
    assert policy.with_verify_only(2, base, [[0.0] * 16, [0.0] * 16]) == base
    # strong continuations: E[accepted] 0.9 per proposal up to 7
    strong = [min(c, 7) * 0.9 for c in range(16)]
    rates = {(v, 0): 2 * (1 + strong[v - 1]) / cost(v) for v in (2, 3, 4, 6, 8)}
    rates[base] = 2 * (1 + max(strong[1], tidar)) / 0.005
    assert policy.with_verify_only(2, base, [strong, strong]) == max(rates, key=rates.get)
    assert max(rates, key=rates.get)[1] == 0  # a verify-only shape won
    # a weak continuation in one row and none in the other: TiDAR's block is worth more
    weak = [0.0, 0.2] + [0.3] * 14
    rates = {(v, 0): (1 + weak[v - 1] + 1) / cost(v) for v in (2, 3, 4, 6, 8)}
    rates[base] = (1 + max(weak[1], tidar) + 1 + tidar) / 0.005
    assert max(rates, key=rates.get) == base
    assert policy.with_verify_only(2, base, [weak, [0.0] * 16]) == base
    assert policy.with_verify_only(2, base, []) == base


# ---------------------------------------------------------------------------- serving
def serve(scheduler, prompts) -> list:
    results, done = {}, threading.Event()
    for index, prompt in enumerate(prompts):
        def on_delta(delta, index=index):
            if delta.result is not None:
                results[index] = delta.result
                if len(results) == len(prompts):
                    done.set()

        scheduler.submit(Request(prompt, NEW_TOKENS, eos_ids=()), on_delta, lambda kind, message: done.set())
    assert done.wait(600), "the served requests did not finish"
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("drafter,verify_only", [("hybrid", True), ("hybrid", False), ("tidar", True)])
def test_the_scheduler_takes_verify_only_steps_when_they_pay(bundled, transformers_greedy, monkeypatch,  # noqa: F811
                                                               drafter, verify_only):
    from tidar.serving.scheduler import ADAPTIVE, Scheduler, SchedulerConfig

    backend, tokenizer, prompts = bundled
    assert BatchDraftPolicy([0.5] + [0.0] * 14, {1: {0: 0.004, (4, 1): 0.008}}).best(4) == 0
    # AR is the policy's shape ((4, 1) commits ~1.5 tokens in twice AR's time); a verify-only step
    # costs AR's plus 0.57 ms per further query token: it pays where the continuations hold
    policy = BatchDraftPolicy([0.5] + [0.0] * 14, {n: {0: 0.004, (4, 1): 0.008} for n in (1, 4)})
    shapes = []
    set_draft_len = DecodeEngine.set_draft_len

    def spy(self, draft_len, draft_blocks=None):
        shapes.append((draft_len, draft_blocks))
        set_draft_len(self, draft_len, draft_blocks)

    monkeypatch.setattr(DecodeEngine, "set_draft_len", spy)
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(drafter=drafter, verify_only=verify_only),
                          policy=policy)
    try:
        assert scheduler.engines[ADAPTIVE].verify_only == (drafter == "hybrid" and verify_only)
        results = serve(scheduler, prompts)
    finally:
        scheduler.close()
    assert [r.token_ids for r in results] == transformers_greedy
    verify_steps = [s for s in shapes if s[1] == 0 and s[0] > 0]
    if drafter == "hybrid" and verify_only:
        assert verify_steps
        assert sum(r.stats.accepted_by_source.get("ngram", 0) for r in results) > 0
    else:
        assert not verify_steps


def test_the_serving_option_parses_and_renders(tmp_path):
    from tidar.serving.options import OptionsError, ServingOptions
    from tidar.serving.repository import render_repository

    assert ServingOptions().verify_only is True
    off = ServingOptions.from_parameters({"verify_only": "false"})
    assert off.verify_only is False and off.to_parameters()["verify_only"] == "false"
    assert ServingOptions.from_parameters({"verify_only": "TRUE"}).verify_only is True
    with pytest.raises(OptionsError, match="config.pbtxt: parameter 'verify_only' has an invalid value 'maybe'"):
        ServingOptions.from_parameters({"verify_only": "maybe"})
    with pytest.raises(OptionsError, match="verify_only must be true or false, got 1"):
        ServingOptions(verify_only=1).validate()
    repository = render_repository(tmp_path / "repo", off)
    text = (repository / "tidar" / "config.pbtxt").read_text()
    assert 'key: "verify_only" value: { string_value: "false" }' in text


def test_an_engine_with_a_shape_policy_adapts_before_every_step(bundled, transformers_greedy, monkeypatch):  # noqa: F811
    """`DecodeEngine(shape_policy=...)` (what `tidar generate` and `tidar bench`'s default method
    use): before each step the policy's shape for the batch or a verify-only one; output unchanged."""
    backend, tokenizer, prompts = bundled
    policy = BatchDraftPolicy([0.5] + [0.0] * 14, {n: {0: 0.004, (4, 1): 0.003} for n in (1, 4)})
    assert policy.best(4) == (4, 1)
    shapes = []
    set_draft_len = DecodeEngine.set_draft_len
    monkeypatch.setattr(DecodeEngine, "set_draft_len",
                        lambda self, b, k=None: (shapes.append((b, k)), set_draft_len(self, b, k))[1])
    engine = DecodeEngine(backend, tokenizer, draft_len=0, drafter="hybrid", verify_only=True, shape_policy=policy)
    results = engine.generate([Request(p, NEW_TOKENS, eos_ids=()) for p in prompts])
    assert [r.token_ids for r in results] == transformers_greedy
    assert (4, 1) in shapes and any(k == 0 and b > 0 for b, k in shapes)


# ---------------------------------------------------------------------------- a served step's overhead
def test_step_overhead_is_the_loop_time_beyond_the_engines_per_row():
    from tidar.serving.scheduler import StepOverhead

    now = [0.0]
    overhead = StepOverhead(weight=0.5, clock=lambda: now[0])
    overhead.start()
    overhead.end(0.010, 4, admitted=False)
    now[0] = 0.030
    overhead.start()  # (0.030 - 0.010) / 4 rows
    assert overhead.per_row == pytest.approx(0.005) and overhead.samples == 1
    overhead.end(0.010, 4, admitted=True)  # a prefill ran: not a step's overhead
    now[0] = 0.100
    overhead.start()
    assert overhead.samples == 1
    overhead.end(0.010, 2, admitted=False)
    now[0] = 0.130
    overhead.start()  # sample (0.030 - 0.010) / 2 = 0.010, averaged with weight 0.5
    assert overhead.per_row == pytest.approx(0.0075) and overhead.seconds(4) == pytest.approx(0.030)
    overhead.end(0.010, 2, admitted=False)
    overhead.pause()  # the loop waited for work
    now[0] = 5.0
    overhead.start()
    assert overhead.samples == 2


def test_the_overhead_makes_steps_of_more_tokens_pay():
    """AR 1 s, (4, 1) 1.6 s committing 4/3 tokens: AR alone; with 1 s of overhead on every step,
    (4, 1) (4/3 / 2.6 against 1 / 2). A weak continuation (0.05 expected at one proposal) at (2, 0),
    1 + 0.6 / 7 s by interpolation: 1.05 / 1.086 loses to AR's 1 / 1, 1.05 / 2.086 beats 1 / 2."""
    policy = BatchDraftPolicy([0.5] + [0.0] * 14, {1: {0: 1.0, (4, 1): 1.6}})
    assert policy.expected_tokens_per_step((4, 1)) == pytest.approx(4 / 3)
    assert policy.best(1) == 0 and policy.best(1, overhead=1.0) == (4, 1)
    row = [0.0, 0.05] + [0.06] * 14
    assert policy.with_verify_only(1, (0, 0), [row]) == (0, 0)
    assert policy.with_verify_only(1, (0, 0), [row], overhead=1.0) == (2, 0)


def test_a_served_scheduler_measures_its_step_overhead(bundled):  # noqa: F811
    from tidar.serving.scheduler import Scheduler, SchedulerConfig

    backend, tokenizer, prompts = bundled
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(draft_len=4))
    done, finished = threading.Event(), []
    try:
        def slow_delivery(delta):  # a caller that takes 5 ms per delta, on the decode thread
            time.sleep(0.005)
            if delta.finished:
                finished.append(delta)
                if len(finished) == 2:
                    done.set()

        for prompt in prompts[:2]:
            scheduler.submit(Request(prompt, NEW_TOKENS, eos_ids=()), slow_delivery, lambda kind, message: done.set())
        assert done.wait(600)
        assert scheduler.step_overhead.samples > 5
        assert 0.004 < scheduler.step_overhead.per_row < 0.05
    finally:
        scheduler.close()

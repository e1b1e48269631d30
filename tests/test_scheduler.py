"""The serving scheduler (serving/scheduler.py) on CPU, without a server.

- Continuous batching is lossless: requests submitted at different times, sharing steps whose
  draft length the policy changes as the batch grows and shrinks, each get exactly the AR
  greedy output of transformers (the independent oracle) and of the request served alone.
- Requests with a fixed draft length or AR mode run beside adaptive ones, each exact.
- Cancellation and timeouts end the row at the next step with the output so far, free its
  cache row, and the scheduler keeps serving; a caller whose callback raises is cancelled.
- A full queue raises Overloaded; invalid requests get `on_error` and never touch the batch.
- The counters agree with the per-request statistics the deltas carry.
- DecodeEngine.set_draft_len keeps greedy output exact under any schedule of lengths.
- The adaptive engine takes the policy's draft shape (b, k), k < b included, and says so.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from fakes.logits_backend import LogitsBackend
from tidar.runtime.autotune import BatchDraftPolicy, as_shape
from tidar.runtime.generate import DecodeEngine, Request, RequestError
from tidar.serving.scheduler import OVERHEAD_QUANTUM, Overloaded, Scheduler, SchedulerConfig
from tidar.runtime.tokenizer import Tokenizer

FAMILY = "qwen2"
PROMPTS = ("def main():\n", "import os\n", "class A:\n    pass\n", "x = [1, 2, 3]\n", "# comment\n",
           "for i in range(10):\n", "while True:\n    break\n", "return None\n")
EOS = 0


class Collector:
    """Records what the scheduler delivers to one request."""

    def __init__(self):
        self.deltas, self.errors = [], []
        self.done = threading.Event()

    def on_delta(self, delta):
        self.deltas.append(delta)
        if delta.finished:
            self.done.set()

    def on_error(self, kind, message):
        self.errors.append((kind, message))
        self.done.set()

    @property
    def token_ids(self):
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def finish_reason(self):
        return self.deltas[-1].finish_reason if self.deltas else None

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "the request did not finish"
        return self


@pytest.fixture(scope="module")
def backend(tiny_backends):
    return tiny_backends[FAMILY]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    return Tokenizer(tiny_checkpoints[FAMILY])


def hf_greedy(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=EOS, pad_token_id=1)
    return out[0, len(prompt):].tolist()


def changing_policy():
    """A policy whose draft shape changes with every batch size (fixed, not measured), so that
    joins and leaves resize the pending drafts; some shapes have k < b mask blocks."""
    table = {1: {(4, 1): 1.0}, 2: {2: 1.0}, 3: {0: 1.0}, 4: {(3, 2): 1.0}, 6: {1: 1.0}, 8: {(5, 2): 1.0}}
    return BatchDraftPolicy(acceptance=[0.5] * 15, step_seconds=table)


def test_policy_picks_best_expected_tokens_per_second():
    policy = BatchDraftPolicy(acceptance=[0.5, 0.25, 0.1],
                              step_seconds={1: {0: 1.0, 2: 1.2, 4: 2.0}, 8: {0: 1.0, 2: 2.0, 4: 4.0}})
    assert policy.best(1) == 2  # 1.5 / 1.2 beats 1 / 1 and 1.85 / 2
    assert policy.best(5) == 0  # the 8-row measurement: drafting does not pay
    assert policy.best(64) == 0  # beyond the table: the largest measured batch
    assert changing_policy().best(5) == 1


def test_adaptive_engine_takes_the_policys_shape(backend, tokenizer):
    """One row: the policy's (4, 1) for batch 1 is the engine's shape and the counters' gauges;
    two rows: the policy's draft length 2 means k = 2."""
    from tidar.serving.scheduler import ADAPTIVE

    scheduler = Scheduler(backend, tokenizer, policy=changing_policy())
    try:
        engine = scheduler.engines[ADAPTIVE]
        assert (engine.draft_len, engine.draft_blocks) == (4, 1)
        assert (scheduler.counters.draft_len, scheduler.counters.draft_blocks) == (4, 1)
        assert engine.layout.num_new == 4 + 1 * 4
        scheduler.close()
        scheduler = Scheduler(backend, tokenizer, SchedulerConfig(draft_len=2), policy=None)
        assert (scheduler.counters.draft_len, scheduler.counters.draft_blocks) == (2, 2)
    finally:
        scheduler.close()


def test_the_policy_is_scored_once_per_batch_size(backend, tokenizer, monkeypatch):
    """`BatchDraftPolicy.best` solves a Markov chain per candidate; it remembers its picks and the
    scheduler rounds the measured step overhead (`StepOverhead`), so candidates are scored once per
    batch size and overhead quantum, not at every step, and the answer is used at every step."""
    from tidar.runtime import autotune

    policy, picks = changing_policy(), []
    pick = autotune.pick
    monkeypatch.setattr(autotune, "pick", lambda *args, **kwargs: picks.append(args) or pick(*args, **kwargs))
    scheduler = Scheduler(backend, tokenizer, policy=policy)
    try:
        done = Collector()
        scheduler.submit(Request(tokenizer.encode(PROMPTS[0]), 40, eos_ids=()), done.on_delta, done.on_error)
        done.wait()
        keys = [key for key in policy._memo if key[0] == "best"]  # (batch size, overhead quantum) asked
        assert len(done.deltas) > 5 and len(picks) == len(keys) < len(done.deltas)
        assert all(size == 1 and round(overhead / OVERHEAD_QUANTUM, 6).is_integer() for _, size, overhead in keys)
        assert done.deltas[1].step_stats.draft_tokens <= 3  # steps ran at the policy's (4, 1)
    finally:
        scheduler.close()


def test_set_draft_len_keeps_greedy_exact_under_any_schedule(backend, hf_models, tokenizer):
    rng = random.Random(7)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:4]]
    engine = DecodeEngine(backend, tokenizer, draft_len=3)
    deltas = engine.add([Request(p, 24, eos_ids=[EOS]) for p in prompts])
    while engine.rows:
        engine.set_draft_len(rng.choice([0, 1, 2, 5, 8, 16]))
        deltas += engine.step()
    by_prompt = {tuple(d.result.prompt_ids): d.result.token_ids for d in deltas if d.finished}
    for prompt in prompts:
        assert by_prompt[tuple(prompt)] == hf_greedy(hf_models[FAMILY], prompt, 24)


def test_continuous_batching_equals_transformers_and_solo(backend, hf_models, tokenizer):
    policy = changing_policy()
    chosen = []
    best = policy.best
    policy.best = lambda batch, overhead=0.0: chosen.append(best(batch, overhead)) or chosen[-1]
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(max_batch_size=8), policy=policy)
    try:
        collectors, lengths = [], [30, 12, 25, 7, 18, 30, 9, 22]
        for i, (text, length) in enumerate(zip(PROMPTS, lengths)):
            collector = Collector()
            scheduler.submit(Request(tokenizer.encode(text), length, eos_ids=[EOS]), collector.on_delta,
                             collector.on_error)
            collectors.append(collector)
            if i % 3 == 2:  # later requests join a running batch
                collectors[i - 1].wait()
        for collector in collectors:
            collector.wait()
        assert len(set(chosen)) >= 3, f"the batch never changed its draft length: {chosen}"
        assert any(as_shape(c)[1] < as_shape(c)[0] for c in chosen), f"no step with k < b blocks: {chosen}"
        for text, length, collector in zip(PROMPTS, lengths, collectors):
            prompt = tokenizer.encode(text)
            assert collector.errors == []
            assert collector.token_ids == hf_greedy(hf_models[FAMILY], prompt, length), text
        solo = DecodeEngine(backend, tokenizer, draft_len=4).generate([Request(tokenizer.encode(PROMPTS[0]), 30,
                                                                               eos_ids=[EOS])])[0]
        assert collectors[0].token_ids == solo.token_ids
        assert scheduler.idle and scheduler.counters.active_rows == 0
        assert all(not engine.rows and engine.cache.batch == 0 for engine in scheduler.engines.values())
    finally:
        scheduler.close()


def test_fixed_draft_lengths_and_ar_run_beside_adaptive_rows(backend, hf_models, tokenizer):
    scheduler = Scheduler(backend, tokenizer, policy=changing_policy())
    try:
        runs = [(PROMPTS[0], None), (PROMPTS[1], 0), (PROMPTS[2], 5), (PROMPTS[3], 16), (PROMPTS[4], None)]
        collectors = []
        for text, draft_len in runs:
            collector = Collector()
            scheduler.submit(Request(tokenizer.encode(text), 20, eos_ids=[EOS]), collector.on_delta,
                             collector.on_error, draft_len=draft_len)
            collectors.append(collector)
        for (text, _), collector in zip(runs, collectors):
            assert collector.wait().token_ids == hf_greedy(hf_models[FAMILY], tokenizer.encode(text), 20)
        assert {0, 5, 16} <= set(scheduler.engines)
    finally:
        scheduler.close()


def test_counters_agree_with_request_statistics(backend, tokenizer):
    # TiDAR's block alone: every drafting step proposes b - 1 = 3 (an n-gram proposal may be shorter)
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(draft_len=4, drafter="tidar"))
    try:
        collectors = []
        for text in PROMPTS[:5]:
            collector = Collector()
            scheduler.submit(Request(tokenizer.encode(text), 16, eos_ids=()), collector.on_delta, collector.on_error)
            collectors.append(collector)
        finals = [c.wait().deltas[-1].result.stats for c in collectors]
        counters = scheduler.counters
        assert counters.generated_tokens == sum(len(c.token_ids) for c in collectors) == 5 * 16
        assert counters.drafts == sum(s.drafts for s in finals) > 0
        assert counters.draft_tokens == sum(s.draft_tokens for s in finals) == 3 * counters.drafts
        assert counters.accepted_tokens == sum(s.accepted_tokens for s in finals)
        assert counters.accepted_per_position == [sum(col) for col in zip(*(s.accepted_per_position for s in finals))]
        assert counters.requests["length"] == 5
        assert sum(counters.drain_observations()) == 5 * 16 and counters.tokens_per_forward == []
    finally:
        scheduler.close()


def test_snapshot_is_taken_under_the_lock_the_scheduler_counts_under(backend, tokenizer):
    """While a caller holds the scheduler's lock, the running scheduler cannot change a counter
    (it changes them only under that lock), so a snapshot never sees a half-made update; the
    snapshot is a copy and takes the histogram observations with it."""
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(draft_len=4))
    try:
        collector = Collector()
        scheduler.submit(Request(tokenizer.encode(PROMPTS[0]), 400, eos_ids=()), collector.on_delta,
                         collector.on_error)
        while not scheduler.snapshot().generated_tokens:
            time.sleep(0.01)
        with scheduler._cond:
            held = scheduler.snapshot()
            time.sleep(0.5)  # the scheduler thread keeps stepping, up to its next count
            assert scheduler.snapshot() == held
        collector.wait()
        final = scheduler.snapshot()
        assert final.generated_tokens == 400 and final.requests["length"] == 1
        assert final.requests is not scheduler.counters.requests and scheduler.counters.tokens_per_forward == []
    finally:
        scheduler.close()


def slow_backend(backend, seconds):
    """The real backend with every forward slowed down, to make timing-dependent events certain."""

    class Slow(LogitsBackend):
        config = backend.config

        def new_cache(self, batch, capacity):
            return backend.new_cache(batch, capacity)

        def logits(self, input_ids, layout, cache):
            time.sleep(seconds)
            return backend.forward(input_ids, layout, cache)

    return Slow()


def test_cancel_and_timeout_free_rows_and_keep_serving(backend, hf_models, tokenizer):
    scheduler = Scheduler(slow_backend(backend, 0.01), tokenizer, SchedulerConfig(draft_len=2))
    try:
        cancelled, timed_out, good = Collector(), Collector(), Collector()
        handle = scheduler.submit(Request(tokenizer.encode(PROMPTS[0]), 1000, eos_ids=()), cancelled.on_delta,
                                  cancelled.on_error)
        scheduler.submit(Request(tokenizer.encode(PROMPTS[1]), 1000, eos_ids=()), timed_out.on_delta,
                         timed_out.on_error, timeout=0.3)
        while len(cancelled.deltas) < 3:
            time.sleep(0.01)
        scheduler.cancel(handle)
        assert cancelled.wait().finish_reason == "cancelled" and 0 < len(cancelled.token_ids) < 1000
        assert timed_out.wait().finish_reason == "timeout" and 0 < len(timed_out.token_ids) < 1000
        scheduler.submit(Request(tokenizer.encode(PROMPTS[2]), 10, eos_ids=[EOS]), good.on_delta, good.on_error)
        assert good.wait().token_ids == hf_greedy(hf_models[FAMILY], tokenizer.encode(PROMPTS[2]), 10)
        assert scheduler.counters.requests["cancelled"] == 1 and scheduler.counters.requests["timeout"] == 1
        assert scheduler.idle and scheduler.engines["adaptive"].cache.batch == 0
    finally:
        scheduler.close()


def test_is_cancelled_and_a_raising_callback_end_the_request(backend, tokenizer):
    scheduler = Scheduler(slow_backend(backend, 0.005), tokenizer, SchedulerConfig(draft_len=2))
    try:
        flag = threading.Event()
        polled, broken = Collector(), Collector()
        scheduler.submit(Request(tokenizer.encode(PROMPTS[0]), 1000, eos_ids=()), polled.on_delta, polled.on_error,
                         is_cancelled=flag.is_set)
        calls = []

        def breaks(delta):
            calls.append(delta)
            if len(calls) == 2:
                broken.done.set()
                raise ConnectionError("stream closed")

        scheduler.submit(Request(tokenizer.encode(PROMPTS[1]), 1000, eos_ids=()), breaks, broken.on_error)
        while len(polled.deltas) < 2:
            time.sleep(0.01)
        flag.set()
        assert polled.wait().finish_reason == "cancelled"
        broken.wait()
        deadline = time.monotonic() + 10
        while not scheduler.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.idle and scheduler.counters.requests["cancelled"] == 2
        assert len(calls) <= 4  # it left at the next step
    finally:
        scheduler.close()


def test_is_cancelled_is_asked_at_most_once_per_poll_interval(backend, tokenizer):
    """In Triton each `is_cancelled` is a round trip to the server process: a row is asked at most
    once per `cancel_poll_seconds`, not at every step, and a cancellation still ends it within
    that interval plus a step."""
    poll = 0.1
    scheduler = Scheduler(slow_backend(backend, 0.005), tokenizer, SchedulerConfig(draft_len=2,
                                                                                   cancel_poll_seconds=poll))
    try:
        flag, asked = threading.Event(), []

        def is_cancelled():
            asked.append(time.monotonic())
            return flag.is_set()

        polled = Collector()
        scheduler.submit(Request(tokenizer.encode(PROMPTS[0]), 10_000, eos_ids=()), polled.on_delta,
                         polled.on_error, is_cancelled=is_cancelled)
        time.sleep(1.0)
        steps_before = len(polled.deltas)
        flag.set()
        set_at = time.monotonic()
        assert polled.wait().finish_reason == "cancelled"
        ended = time.monotonic()
        gaps = [b - a for a, b in zip(asked, asked[1:])]
        assert steps_before > 2 * len(asked) and len(asked) >= 5  # asked far less often than stepped
        assert min(gaps) >= poll * 0.99
        assert ended - set_at < poll + 1.0
    finally:
        scheduler.close()


def test_full_queue_raises_overloaded_and_invalid_requests_get_errors(backend, tokenizer):
    gate = threading.Event()
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(draft_len=2, max_batch_size=1, max_queue_size=1))
    try:
        first = Collector()

        def blocking(delta):  # holds the loop inside the first step
            gate.wait(30)
            first.on_delta(delta)

        scheduler.submit(Request(tokenizer.encode(PROMPTS[0]), 5, eos_ids=()), blocking, first.on_error)
        while scheduler.counters.queue_depth or scheduler.idle:
            time.sleep(0.01)
        queued = Collector()
        scheduler.submit(Request([3, 10 ** 6, 4], 5), queued.on_delta, queued.on_error)  # outside the vocabulary
        with pytest.raises(Overloaded, match="max_queue_size = 1"):
            scheduler.submit(Request(tokenizer.encode(PROMPTS[1]), 5), Collector().on_delta, Collector().on_error)
        gate.set()
        vocab = backend.config.vocab_size
        assert queued.wait().errors == [("invalid", f"prompt token {10 ** 6} is outside the vocabulary [0, {vocab})")]
        assert len(first.wait().token_ids) == 5
        assert scheduler.counters.requests["overloaded"] == 1 and scheduler.counters.requests["invalid"] == 1
        with pytest.raises(RequestError, match="draft_len"):
            scheduler.submit(Request([3], 5), Collector().on_delta, Collector().on_error, draft_len=99)
    finally:
        gate.set()
        scheduler.close()


def test_close_ends_running_and_queued_requests(backend, tokenizer):
    scheduler = Scheduler(slow_backend(backend, 0.01), tokenizer, SchedulerConfig(draft_len=2, max_batch_size=1))
    running, queued = Collector(), Collector()
    scheduler.submit(Request(tokenizer.encode(PROMPTS[0]), 1000, eos_ids=()), running.on_delta, running.on_error)
    scheduler.submit(Request(tokenizer.encode(PROMPTS[1]), 1000, eos_ids=()), queued.on_delta, queued.on_error)
    while not running.deltas:
        time.sleep(0.01)
    scheduler.close()
    assert running.wait().finish_reason == "cancelled" and queued.wait().finish_reason == "cancelled"
    with pytest.raises(Overloaded, match="shutting down"):
        scheduler.submit(Request([3], 5), Collector().on_delta, Collector().on_error)

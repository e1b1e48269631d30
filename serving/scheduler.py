"""Continuous batching for a server: many concurrent requests share the decode steps.

    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(max_batch_size=16, max_queue_size=64))
    handle = scheduler.submit(request, on_delta, on_error, draft_len=None, timeout=30.0)
    scheduler.cancel(handle)          # or: is_cancelled() of the submission returns True
    scheduler.close()

One background thread runs the loop. Between two steps it
  1. ends rows whose caller cancelled (or whose stream broke) and rows past their deadline
     (finish reason "cancelled" / "timeout"; the partial output is delivered, the cache row freed);
     a submission's `is_cancelled` is asked at most every `cancel_poll_seconds`;
  2. admits queued requests while the batch has room: each is validated (`DecodeEngine.check`;
     a bad one gets `on_error` and never touches the batch) and prefilled, then joins;
  3. adapts the draft shape (b, k) of the shared batch to its size (`BatchDraftPolicy`: the
     measured step latency per batch size and shape, plus the overhead a served step has beyond
     it (`StepOverhead`, measured as it serves), times the model's acceptance; 0 = AR is a
     candidate), and, when the drafter proposes n-grams, to the rows' n-gram continuations: a
     verify-only step (v, 0) checks them without drafting (docs/design.md §3.10);
  4. runs one step of every engine that has rows and hands each row's delta to its caller.

Requests that ask for a fixed draft length (or AR, `draft_len=0`) run in an engine of their
own for that length, since one forward has one layout; requests without one share the
adaptive engine. Rows of one engine keep their own lengths, sampling settings and stop
conditions (docs/design.md I4: each row's output equals the request served alone).

The queue is bounded: `submit` raises `Overloaded` when `max_queue_size` requests wait.
Counters (`SchedulerCounters`) follow vLLM's speculative-decoding metrics; they are plain
Python numbers that a server publishes from a thread of its own, so that publishing (an IPC
call per metric in Triton's Python backend) never delays a step.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from tidar.runtime.autotune import BatchDraftPolicy, as_shape
from tidar.runtime.backends.base import Backend
from tidar.runtime.generate import DecodeEngine, Delta, Request, RequestError, add_per_position
from tidar.runtime.layout import Layout
from tidar.runtime.ngram import DEFAULT_DRAFTER
from tidar.runtime.tokenizer import Tokenizer


OVERHEAD_QUANTUM = 0.0005
"""Seconds: the measured step overhead is rounded to a multiple of this before the policy weighs
it, so the policy's pick is scored once per batch size and quantum."""


class StepOverhead:
    """Seconds a served step costs beyond the engines' own steps (docs/design.md §3.10): per
    row, an exponential average over the loop's iterations that admitted nothing of (the time
    from one iteration's start to the next's - the seconds inside the engines' steps) / rows.
    It holds what the decode thread does besides stepping (delivering deltas, polling for
    cancellation, the policy) and what it waits for (the GIL, while the response and metrics
    threads run): what a step of more tokens saves per token. Idle waits are not counted."""

    def __init__(self, weight: float = 0.05, clock: Callable[[], float] = time.perf_counter):
        self.weight, self.clock = weight, clock
        self.per_row = 0.0
        """Current estimate, seconds per row per step."""
        self.samples = 0
        self._started: float | None = None
        self._last: tuple[float, float, int] | None = None  # (start, engine seconds, rows) of the last iteration

    def start(self) -> None:
        now = self.clock()
        if self._last is not None:
            started, engine_seconds, rows = self._last
            sample = max(now - started - engine_seconds, 0.0) / rows
            self.per_row = sample if not self.samples else self.per_row + self.weight * (sample - self.per_row)
            self.samples += 1
        self._started, self._last = now, None

    def end(self, engine_seconds: float, rows: int, admitted: bool) -> None:
        if rows and not admitted and self._started is not None:
            self._last = (self._started, engine_seconds, rows)

    def pause(self) -> None:
        """The loop waits for work: the iteration before it is not measured."""
        self._last = None

    def seconds(self, rows: int) -> float:
        return self.per_row * rows


class Overloaded(RuntimeError):
    """The queue is full; the caller should retry later."""


@dataclass
class SchedulerConfig:
    max_batch_size: int = 16
    """Most rows decoded together (across all engines)."""
    max_queue_size: int = 64
    """Most requests waiting for a row; more are refused with `Overloaded`."""
    draft_len: int | None = None
    """Draft length of requests that do not ask for one; None = adapt to the batch size."""
    drafter: str = DEFAULT_DRAFTER
    """Where the engines' proposals come from (`DecodeEngine`'s drafter, docs/design.md §3.9)."""
    verify_only: bool = True
    """With an adaptive draft length and a drafter that proposes n-grams, weigh at every step the
    verify-only shapes (v, 0) against the policy's shape (`BatchDraftPolicy.with_verify_only`,
    docs/design.md §3.10). Off on a backend with CUDA graphs (they capture no verify-only step)."""
    default_timeout: float | None = None
    """Seconds a request may take from submission (None = no limit) unless it sets its own."""
    max_len: int | None = None
    """KV slots per row of the adaptive engine's cache; set (with max_batch_size rows), the cache is
    allocated once at `prepare_graphs` and never grows; None: sized by requests, grown on demand."""
    cancel_poll_seconds: float = 0.2
    """Least time between two calls of one submission's `is_cancelled`. In Triton's Python backend
    that call is a blocking round trip to the server process (python_backend `PbCancel::IsCancelled`),
    so asking every row at every step would cost a round trip per row per step; a cancelled row
    still leaves within this time plus one step. 0 asks at every step."""


@dataclass
class SchedulerCounters:
    """Totals since start (counters) and the current state (gauges)."""

    requests: collections.Counter = field(default_factory=collections.Counter)
    """Finished requests by outcome: stop, length, cancelled, timeout, invalid, overloaded, error."""
    forward_passes: int = 0
    """Model forwards: one per prefill and one per engine step."""
    row_forwards: int = 0
    """Rows summed over forwards (a step of 8 rows counts 8)."""
    generated_tokens: int = 0
    drafts: int = 0
    """Row steps that verified proposals."""
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    tokens_per_forward: list[int] = field(default_factory=list)
    """Tokens committed per row forward since the last `drain_observations` (for a histogram)."""
    queue_depth: int = 0
    active_rows: int = 0
    draft_len: int = 0
    """Draft length of the adaptive engine."""
    draft_blocks: int = 0
    """Mask blocks k of the adaptive engine's steps."""

    def drain_observations(self) -> list[int]:
        values, self.tokens_per_forward = self.tokens_per_forward, []
        return values


@dataclass
class _Submission:
    request: Request
    on_delta: Callable[[Delta], None]
    on_error: Callable[[str, str], None]
    is_cancelled: Callable[[], bool]
    engine_key: object
    deadline: float | None
    cancelled: bool = False
    next_poll: float = 0.0
    """`time.monotonic()` from which `is_cancelled` may be asked again (`Scheduler._reap`)."""


ADAPTIVE = "adaptive"


class Scheduler:
    """See the module docstring."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None, config: SchedulerConfig | None = None,
                 policy: BatchDraftPolicy | None = None):
        self.backend, self.tokenizer = backend, tokenizer
        self.config = config or SchedulerConfig()
        if self.config.max_batch_size < 1 or self.config.max_queue_size < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue_size >= 0: {self.config}")
        if self.config.draft_len is None and policy is None:
            raise ValueError("an adaptive draft length (draft_len=None) needs a BatchDraftPolicy")
        self.policy = policy
        self.counters = SchedulerCounters()
        b, k = as_shape(self.config.draft_len if self.config.draft_len is not None else policy.best(1))
        self.counters.draft_len, self.counters.draft_blocks = b, k
        rows = self.config.max_batch_size if self.config.max_len is not None else None
        # Not with CUDA graphs: a verify-only layout is not one they capture (never run on a GPU yet).
        self.verify_only = (self.config.verify_only and self.config.draft_len is None
                            and self.config.drafter != "tidar" and getattr(backend, "graphs", None) is None)
        self.engines: dict[object, DecodeEngine] = {ADAPTIVE: DecodeEngine(backend, tokenizer, draft_len=b,
                                                                           draft_blocks=k, max_rows=rows,
                                                                           max_len=self.config.max_len,
                                                                           drafter=self.config.drafter,
                                                                           verify_only=self.verify_only)}
        self.step_overhead = StepOverhead()
        self._queue: collections.deque[_Submission] = collections.deque()
        self._running: dict[object, _Submission] = {}  # request_id -> submission
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="tidar-scheduler", daemon=True)
        self._thread.start()

    def prepare_graphs(self) -> int:
        """Before any request: capture the CUDA graph of every decode step the adaptive engine can
        run — each draft shape the policy picks for 1..max_batch_size rows (or the fixed draft
        length) at every batch bucket of its cache, allocated now for max_batch_size x max_len —
        then freeze capture, so nothing is captured or dropped while requests are served (a step
        without a graph, e.g. of a request's own draft length, runs eagerly). Returns the graphs
        captured; 0 where the backend has none (backends/cuda_graphs.py)."""
        graphs = getattr(self.backend, "graphs", None)
        if graphs is None:
            return 0
        if self.config.max_len is None:
            raise ValueError("prepare_graphs needs SchedulerConfig.max_len: graphs of a cache that grows are dropped")
        if self.config.draft_len is not None:
            shapes = {as_shape(self.config.draft_len)}
        else:
            shapes = {as_shape(self.policy.best(rows)) for rows in range(1, self.config.max_batch_size + 1)}
        cache = self.engines[ADAPTIVE].allocate_cache()
        captured = graphs.prepare(cache, [Layout.decode(b, k) for b, k in sorted(shapes, reverse=True)])
        graphs.freeze()
        return captured

    # ------------------------------------------------------------------ callers
    def submit(self, request: Request, on_delta: Callable[[Delta], None], on_error: Callable[[str, str], None],
               *, draft_len: int | None = None, timeout: float | None = None,
               is_cancelled: Callable[[], bool] = lambda: False) -> object:
        """Queue `request`; its deltas go to `on_delta` (the last has `finished`), or one call of
        `on_error(kind, message)` (kind "invalid" or "error") if it cannot be served. Returns a
        handle for `cancel` (also set as `request.request_id`, which the scheduler owns from
        here on). Raises `Overloaded` if the queue is full, RequestError if `draft_len` or
        `timeout` is invalid."""
        if draft_len is not None:
            self.engines[ADAPTIVE].check_draft_len(draft_len)
        timeout = timeout if timeout is not None else self.config.default_timeout
        if timeout is not None and not timeout > 0:
            raise RequestError(f"timeout must be positive seconds, got {timeout!r}")
        handle = next(self._ids)
        request.request_id = handle
        deadline = time.monotonic() + timeout if timeout is not None else None
        key = ADAPTIVE if draft_len is None else draft_len
        submission = _Submission(request, on_delta, on_error, is_cancelled, key, deadline)
        with self._cond:
            if self._closing:
                raise Overloaded("the scheduler is shutting down")
            if len(self._queue) >= self.config.max_queue_size:
                self.counters.requests["overloaded"] += 1
                raise Overloaded(f"server overloaded: {len(self._queue)} requests are queued "
                                 f"(max_queue_size = {self.config.max_queue_size}); retry later")
            self._queue.append(submission)
            self.counters.queue_depth = len(self._queue)
            self._cond.notify()
        return handle

    def cancel(self, handle: object) -> None:
        """End request `handle`: its row leaves at the next step (or it leaves the queue)."""
        with self._cond:
            for submission in itertools.chain(self._queue, self._running.values()):
                if submission.request.request_id == handle:
                    submission.cancelled = True
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; queued and running requests end with finish reason "cancelled"."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def snapshot(self) -> SchedulerCounters:
        """A copy of the counters taken under the scheduler's lock (the scheduler thread changes
        them only under it); the histogram observations move into the copy."""
        with self._cond:
            c = self.counters
            return dataclasses.replace(c, requests=collections.Counter(c.requests),
                                       accepted_per_position=list(c.accepted_per_position),
                                       tokens_per_forward=c.drain_observations())

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        use_backend_device(self.backend)
        while True:
            with self._cond:
                while not (self._closing or self._queue or self._running):
                    self._cond.wait()
                    self.step_overhead.pause()
                closing = self._closing
            try:
                if closing:
                    self._end_all("cancelled")
                    return
                self.step_overhead.start()
                self._reap()
                admitted = self._admit()
                self._adapt()
                self.step_overhead.end(*self._step(), admitted)
            except Exception:  # a bug must not kill the server: fail the running requests, go on
                self._end_all("error", traceback.format_exc(limit=3))

    def _reap(self) -> None:
        """End cancelled and timed-out requests, queued or running."""
        now = time.monotonic()

        def reason(sub: _Submission) -> str | None:
            if sub.cancelled:
                return "cancelled"
            if now >= sub.next_poll:
                sub.next_poll = now + self.config.cancel_poll_seconds
                if _safe(sub.is_cancelled):
                    return "cancelled"
            return "timeout" if sub.deadline is not None and now >= sub.deadline else None

        with self._cond:
            waiting = [(sub, reason(sub)) for sub in self._queue]
            self._queue = collections.deque(sub for sub, why in waiting if why is None)
            self.counters.queue_depth = len(self._queue)
        for sub, why in waiting:
            if why is not None:
                with self._cond:
                    self.counters.requests[why] += 1
                self._deliver(sub, Delta(sub.request.request_id, [], "", True, why))
        ending: dict[str, list[_Submission]] = collections.defaultdict(list)
        for sub in list(self._running.values()):
            why = reason(sub)
            if why is not None:
                ending[why].append(sub)
        for why, subs in ending.items():
            by_engine = collections.defaultdict(list)
            for sub in subs:
                by_engine[sub.engine_key].append(sub.request.request_id)
            for key, ids in by_engine.items():
                self._dispatch(self.engines[key].finish(ids, why))

    def _admit(self) -> bool:
        """Admit queued requests while there is room; whether any was prefilled."""
        admitted = False
        while len(self._running) < self.config.max_batch_size:
            with self._cond:
                if not self._queue:
                    return admitted
                sub = self._queue.popleft()
                self.counters.queue_depth = len(self._queue)
            engine = self._engine(sub.engine_key)
            try:
                engine.check(sub.request)
            except RequestError as error:
                with self._cond:
                    self.counters.requests["invalid"] += 1
                _safe(sub.on_error, "invalid", str(error))
                continue
            self._running[sub.request.request_id] = sub
            with self._cond:
                self.counters.forward_passes += 1
                self.counters.row_forwards += 1
            self._dispatch(engine.add([sub.request]))
            admitted = True
        return admitted

    def _adapt(self) -> None:
        if self.config.draft_len is not None:
            return
        engine = self.engines[ADAPTIVE]
        if engine.batch_size:
            rows = sum(e.batch_size for e in self.engines.values())
            # rounded, so that the policy (which remembers its picks) scores once per size and quantum
            overhead = round(self.step_overhead.seconds(rows) / OVERHEAD_QUANTUM) * OVERHEAD_QUANTUM
            engine.adapt_shape(self.policy, rows, overhead=overhead)
        with self._cond:
            self.counters.draft_len, self.counters.draft_blocks = engine.draft_len, engine.draft_blocks

    def _step(self) -> tuple[float, int]:
        """One step of every engine with rows; (seconds inside the engines' steps, rows stepped)."""
        seconds, rows = 0.0, 0
        for engine in list(self.engines.values()):
            if engine.batch_size:
                with self._cond:
                    self.counters.forward_passes += 1
                    self.counters.row_forwards += engine.batch_size
                rows += engine.batch_size
                started = time.perf_counter()
                deltas = engine.step()
                seconds += time.perf_counter() - started
                self._dispatch(deltas)
        with self._cond:
            self.counters.active_rows = len(self._running)
        return seconds, rows

    # ------------------------------------------------------------------ plumbing
    def _engine(self, key: object) -> DecodeEngine:
        if key not in self.engines:
            self.engines[key] = DecodeEngine(self.backend, self.tokenizer, draft_len=key, drafter=self.config.drafter)
        return self.engines[key]

    def _dispatch(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            sub = self._running.get(delta.request_id)
            if sub is None:
                continue
            with self._cond:
                self._count(delta)
            self._deliver(sub, delta)
            if delta.finished:
                del self._running[delta.request_id]
                with self._cond:
                    self.counters.requests[delta.finish_reason] += 1
        with self._cond:
            self.counters.active_rows = len(self._running)

    def _deliver(self, sub: _Submission, delta: Delta) -> None:
        """Hand `delta` to the caller; a caller that raises (a broken stream) is cancelled."""
        if _safe(sub.on_delta, delta) is _FAILED:
            sub.cancelled = True

    def _count(self, delta: Delta) -> None:
        """Add one delta's increments to the counters (under the lock)."""
        c, step = self.counters, delta.step_stats
        c.generated_tokens += len(delta.token_ids)
        if delta.token_ids:
            c.tokens_per_forward.append(len(delta.token_ids))
        c.drafts += step.drafts
        c.draft_tokens += step.draft_tokens
        c.accepted_tokens += step.accepted_tokens
        add_per_position(c.accepted_per_position, step.accepted_per_position)

    def _end_all(self, reason: str, detail: str = "") -> None:
        with self._cond:
            queued, self._queue = list(self._queue), collections.deque()
        for sub in queued:
            with self._cond:
                self.counters.requests[reason] += 1
            self._end(sub, reason, detail)
        for key, engine in self.engines.items():
            ids = engine.request_ids()
            try:
                deltas = engine.finish(ids, reason)
            except Exception:
                deltas = []
                engine.reset()
            if reason == "error":
                for sub in [self._running.pop(i) for i in ids if i in self._running]:
                    with self._cond:
                        self.counters.requests[reason] += 1
                    _safe(sub.on_error, "error", f"internal error, the request was ended: {detail}")
            else:
                self._dispatch(deltas)
        for sub in list(self._running.values()):  # rows lost with a broken engine
            self._running.pop(sub.request.request_id)
            with self._cond:
                self.counters.requests[reason] += 1
            self._end(sub, reason, detail)
        with self._cond:
            self.counters.active_rows = 0
            self.counters.queue_depth = 0

    def _end(self, sub: _Submission, reason: str, detail: str) -> None:
        if reason == "error":
            _safe(sub.on_error, "error", f"internal error, the request was ended: {detail}")
        else:
            self._deliver(sub, Delta(sub.request.request_id, [], "", True, reason))


_FAILED = object()


def use_backend_device(backend: Backend) -> None:
    """Make the backend's CUDA device this thread's current one (a new thread starts on device 0:
    kernels launched on the current device, such as the Triton attention kernel's, and
    allocations without a device would otherwise go to GPU 0 for an instance on GPU 1)."""
    device = getattr(backend, "device", None)
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.set_device(device)


def _safe(function: Callable, *args):
    """Call a caller's callback; its failure is the caller's problem, never the loop's."""
    try:
        return function(*args)
    except Exception:
        return _FAILED

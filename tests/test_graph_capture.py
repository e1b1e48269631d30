"""CUDA graphs of a served model are all captured before the server reports ready.

Capture is stood in on CPU by a counting capture layer (cuda_graphs.GraphedForward's `capture`
argument: it records the captured step's batch bucket and replays by running the step, the way
`call_directly` does), on the tiny qwen2 checkpoint with eager attention, so the bucketing,
padding and full-capacity attention are the real ones. Checked:
- `prepare` captures every (batch bucket, decode layout) of a cache, largest bucket first, and
  `freeze` stops capture: an unprepared step runs eagerly and is counted;
- a served run through the real `build_scheduler` (its backend's graphs stood in) captures every
  graph during start-up and none while requests of varying lengths and concurrency are served;
  the cache is allocated once (no growth drops the graphs), every step of the adaptive engine
  replays a graph, and each request's output equals the same request decoded alone without graphs
  (the eager model, itself tested against transformers in tests/test_model.py);
- the policy's shapes for 1..max_batch_size rows are the ones prepared;
- a dense-attention graph attends over the smallest KV bucket that holds the step, not the
  cache's whole capacity (the capacity is now sized for the longest request).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from tidar.runtime.backends import loading
from tidar.runtime.backends.cuda_graphs import GraphedForward, batch_buckets, kv_buckets
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.layout import Layout
from tidar.runtime.sampling import SamplingParams
from tidar.serving.options import ServingOptions
from tidar.serving.requests import build_scheduler
from tidar.serving.scheduler import Scheduler, SchedulerConfig


class CountingCapture:
    """A capture layer that records the bucket of each captured step and replays by running it."""

    def __init__(self):
        self.buckets: list[int] = []
        self.ready = False
        self.after_ready = 0

    def __call__(self, step):
        self.buckets.append(int(step().shape[0]))
        self.after_ready += self.ready
        return step


def graphed_backend(checkpoint) -> tuple[TorchBackend, CountingCapture]:
    backend = TorchBackend.load(checkpoint, dtype="float32", attention="eager", cuda_graphs=False)
    capture = CountingCapture()
    backend.graphs = GraphedForward(backend.model, capture=capture)
    return backend, capture


def test_prepare_captures_every_bucket_largest_first_then_freezes(tiny_checkpoints):
    backend, capture = graphed_backend(tiny_checkpoints["qwen2"])
    cache = backend.new_cache(6, 96)
    cache.clear()
    layouts = [Layout.decode(2), Layout.decode(0), Layout.decode(2)]  # a repeat is captured once
    assert backend.graphs.prepare(cache, layouts) == 2 * len(batch_buckets(6)) == 8
    assert capture.buckets == [6, 6, 4, 4, 2, 2, 1, 1]  # largest first: the pool is sized by the largest graph
    assert backend.graphs.prepare(cache, layouts) == 0  # kept
    backend.graphs.freeze()
    cache.add_rows(3)
    assert backend.graphs.handles(Layout.decode(2), cache)
    assert not backend.graphs.handles(Layout.decode(3), cache)  # not prepared: the eager path
    assert backend.graphs.uncaptured_steps == 1
    with pytest.raises(ValueError, match="after freeze"):
        backend.graphs.prepare(cache, [Layout.decode(3)])
    with pytest.raises(ValueError, match="only decode layouts"):
        GraphedForward(backend.model, capture=capture).prepare(cache, [Layout.prefill(5, 2)])


def test_policy_shapes_are_prepared(tiny_checkpoints):
    backend, capture = graphed_backend(tiny_checkpoints["qwen2"])
    policy = SimpleNamespace(best=lambda rows: 3 if rows < 3 else (2, 1) if rows < 5 else 0)
    scheduler = Scheduler(backend, None, SchedulerConfig(max_batch_size=5, max_len=64), policy=policy)
    try:
        assert scheduler.prepare_graphs() == 3 * len(batch_buckets(5))
        cache = scheduler.engines["adaptive"].cache
        assert (cache.max_rows, cache.capacity) == (5, 64)
        graphs = backend.graphs._graphs_of(cache)
        assert {layout for _, layout, _ in graphs} == {Layout.decode(3), Layout.decode(2, 1), Layout.decode(0)}
        assert backend.graphs.frozen
    finally:
        scheduler.close()


def served_alone(backend: TorchBackend, request: Request, draft_len: int) -> list[int]:
    engine = DecodeEngine(backend, None, draft_len=draft_len)
    deltas = engine.add([request])
    while engine.batch_size:
        deltas += engine.step()
    return [t for d in deltas for t in d.token_ids]


def test_no_capture_after_the_server_is_ready(tiny_checkpoints, monkeypatch):
    checkpoint = tiny_checkpoints["qwen2"]
    backend, capture = graphed_backend(checkpoint)
    monkeypatch.setattr(loading, "load_backend", lambda name, folder, **options: backend)
    options = ServingOptions(model_dir=str(checkpoint), backend="torch", draft_len=2, max_batch_size=4)
    attended = []
    hidden_states = backend.model.hidden_states

    def recording(*args, kv_len=None, **kwargs):
        attended.append(kv_len)
        return hidden_states(*args, kv_len=kv_len, **kwargs)
    backend.model.hidden_states = recording
    scheduler, _, config, _ = build_scheduler(checkpoint, options, progress=lambda line: None)
    try:
        prepared = backend.graphs.captures
        cache = scheduler.engines["adaptive"].cache
        assert (cache.max_rows, cache.capacity) == (4, DecodeEngine(backend).max_slots())
        widths = kv_buckets(cache.capacity)
        assert len(widths) > 1 and widths[0] == 256
        assert prepared == len(batch_buckets(4)) * len(widths)
        assert capture.buckets == [rows for rows in (4, 2, 1) for _ in widths]  # largest first
        capture.ready = True  # the Triton model reports ready once build_scheduler returns
        attended.clear()

        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, config.vocab_size, (int(n),), generator=generator).tolist()
                   for n in torch.randint(2, 12, (9,), generator=generator)]
        lengths = [3, 17, 8, 25, 5, 12, 30, 2, 9]
        outputs, done = {}, threading.Semaphore(0)

        def on_delta(index):
            def deliver(delta):
                outputs.setdefault(index, []).extend(delta.token_ids)
                if delta.finished:
                    done.release()
            return deliver

        for index, (prompt, length) in enumerate(zip(prompts, lengths)):
            scheduler.submit(Request(prompt, length, SamplingParams(), eos_ids=()), on_delta(index),
                             lambda kind, message: pytest.fail(f"{kind}: {message}"))
        for _ in prompts:
            assert done.acquire(timeout=300)
        assert capture.after_ready == 0 and backend.graphs.captures == prepared
        assert backend.graphs.uncaptured_steps == 0 and backend.graphs.replays > 0
        assert cache.allocations == 1 and scheduler.engines["adaptive"].cache is cache
        # eager attention: every graphed step attends over the smallest KV bucket, not the capacity
        # (prompts < 12 tokens + at most 30 new + one step fit in 256 slots)
        assert set(attended) - {None} == {256}
    finally:
        scheduler.close()
    eager = TorchBackend.load(checkpoint, dtype="float32", attention="eager", cuda_graphs=False)
    for index, (prompt, length) in enumerate(zip(prompts, lengths)):
        assert outputs[index] == served_alone(eager, Request(prompt, length, SamplingParams(), eos_ids=()), 2)

"""CUDA graphs for the torch backend (runtime/backends/cuda_graphs.py).

On any machine: the batch buckets, which forwards are graphed, attention over the whole cache
capacity (the graphs' static width) against the attended width of the eager path for every
lowering, the padding of a batch to its bucket (padded rows write free storage only, their outputs
are dropped), and whole decode runs with rows joining and leaving and the draft length changing,
where the graphed path with capture replaced by a direct call (`call_directly`) must give the
eager path's tokens. Graphs are dropped when the cache storage is reallocated and when the model
changes; the option is refused, naming it, where graphs cannot run. On CUDA (skipped elsewhere):
the same decode runs with real graphs give the tokens of the eager backend, and steps are replays.
"""

from __future__ import annotations

import pytest
import torch

from tidar.cli import main
from tidar.serving.repository import RenderError, render_repository
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.cache import KVCache
from tidar.runtime.backends.cuda_graphs import (GraphedForward, batch_bucket, batch_buckets, call_directly,
                                       is_decode_layout)
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.layout import Layout
from tidar.runtime.model import TiDARModel
from tidar.serving.options import ServingOptions
from tidar.train.checkpoint import init_random_weights, tiny_config

VOCAB = 512
BLOCK = 8


def make_model(attention: str = "eager", family: str = "qwen2") -> TiDARModel:
    model = TiDARModel(tiny_config(family, VOCAB, block_size=BLOCK), attention=attention).eval()
    init_random_weights(model, seed=0)
    return model


def graphed(model: TiDARModel) -> TorchBackend:
    """A torch backend whose decode steps take the graphed path, capture replaced by a direct call."""
    backend = TorchBackend(model)
    backend.graphs = GraphedForward(model, capture=call_directly)
    return backend


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (5 + 4 * i,), generator=generator).tolist() for i in range(count)]


def filled_cache(model: TiDARModel, lengths: list[int], max_rows: int, capacity: int = 96):
    """A cache of `max_rows` rows whose first len(lengths) rows are active with random committed K/V."""
    cache = model.new_cache(max_rows, capacity)
    generator = torch.Generator().manual_seed(1)
    cache._keys.copy_(torch.randn(cache._keys.shape, generator=generator))
    cache._values.copy_(torch.randn(cache._values.shape, generator=generator))
    cache.clear()
    cache.add_rows(len(lengths))
    cache.commit(lengths)
    return cache


def clone_cache(cache: KVCache) -> KVCache:
    """An independent copy of `cache` (storage, lengths), for running the eager path beside it."""
    copy = KVCache.__new__(KVCache)
    copy.__dict__.update(cache.__dict__)
    copy._keys, copy._values, copy._lengths = cache._keys.clone(), cache._values.clone(), cache._lengths.clone()
    copy._host = list(cache._host)
    return copy


# ---------------------------------------------------------------- buckets and what is graphed
@pytest.mark.parametrize("max_rows, buckets", [(1, [1]), (2, [1, 2]), (12, [1, 2, 4, 8, 12]),
                                               (16, [1, 2, 4, 8, 16]), (17, [1, 2, 4, 8, 16, 17])])
def test_batch_buckets_are_powers_of_two_up_to_max_rows(max_rows, buckets):
    assert batch_buckets(max_rows) == buckets
    for batch in range(1, max_rows + 1):
        bucket = batch_bucket(batch, max_rows)
        assert bucket in buckets and bucket >= batch
        assert all(b < batch for b in buckets if b < bucket)  # the smallest that holds the batch


@pytest.mark.parametrize("batch, max_rows", [(0, 4), (5, 4), (1, 0)])
def test_batch_outside_the_cache_is_refused(batch, max_rows):
    with pytest.raises(ValueError, match="batch|max_rows"):
        batch_bucket(batch, max_rows)


def test_decode_layouts_are_graphed_and_prefills_are_not():
    for b in range(0, 17):
        assert is_decode_layout(Layout.decode(b))
    for b in range(2, 17):
        for k in range(1, b):  # a step with fewer mask blocks than drafts
            assert is_decode_layout(Layout(causal_len=b, num_blocks=k, block_len=b, first_visible=1, visible_stride=1))
    for prompt in (2, 5, 17):
        for b in (0, 1, 4, 16):
            assert not is_decode_layout(Layout.prefill(prompt, b))
    assert not is_decode_layout(Layout.prefill(1, 1))
    assert not is_decode_layout(Layout.training(8, 4))
    assert not is_decode_layout(Layout.autoregressive(3))


def test_only_decode_steps_on_a_whole_cache_are_handled():
    model = make_model()
    forward = GraphedForward(model, capture=call_directly)
    cache = filled_cache(model, [4, 7], max_rows=4)
    assert forward.handles(Layout.decode(4), cache)
    assert not forward.handles(Layout.prefill(9, 4), cache)
    assert not forward.handles(Layout.decode(4), cache.row(0))  # a prefill's row view
    assert not forward.handles(Layout.decode(4), None)
    with pytest.raises(ValueError, match="view"):
        cache.row(0).padded(2)
    with pytest.raises(ValueError, match="pad a batch of 2 to 5"):
        cache.padded(5)


# ---------------------------------------------------------------- the static shape
@pytest.mark.parametrize("attention", ["eager", "sdpa", "triton"])
@pytest.mark.parametrize("draft_len", [0, 3, 8])
def test_attention_over_the_whole_capacity_equals_the_attended_width(attention, draft_len):
    """Every lowering hides the slots after a row's new tokens: kv_len = capacity changes nothing."""
    model = make_model(attention)
    layout = Layout.decode(draft_len)
    cache = filled_cache(model, [4, 11, 0], max_rows=3)
    other = clone_cache(cache)
    ids = torch.randint(3, VOCAB, (3, layout.num_new), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        narrow = model.hidden_states(ids, layout, cache)
        wide = model.hidden_states(ids, layout, other, kv_len=other.capacity)
    torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other._keys, cache._keys, rtol=1e-5, atol=1e-5)  # the same K/V, same slots


def test_full_capacity_still_checks_that_the_new_tokens_fit():
    model = make_model()
    cache = filled_cache(model, [90], max_rows=2)
    ids = torch.zeros(1, Layout.decode(4).num_new, dtype=torch.long)
    forward = GraphedForward(model, capture=call_directly)
    with pytest.raises(ValueError, match="capacity 96 is too small for 110 slots"):
        forward(ids, Layout.decode(4), cache)
    with pytest.raises(ValueError, match="capacity 96 is too small for 97 slots"):
        model.hidden_states(ids, Layout.decode(4), cache, kv_len=97)


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("batch, bucket", [(3, 4), (5, 8), (8, 8)])
def test_a_padded_step_equals_the_eager_step_and_writes_only_free_rows(batch, bucket):
    model = make_model("sdpa")
    layout = Layout.decode(4)
    lengths = [3 + 5 * i for i in range(batch)]
    cache = filled_cache(model, lengths, max_rows=8)
    eager_cache, before = clone_cache(cache), clone_cache(cache)
    ids = torch.randint(3, VOCAB, (batch, layout.num_new), generator=torch.Generator().manual_seed(3))
    forward = GraphedForward(model, capture=call_directly)
    got = forward(ids, layout, cache)
    with torch.inference_mode():
        expected = model.hidden_states(ids, layout, eager_cache)
    assert got.shape == expected.shape == (batch, layout.num_new, model.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # active rows: the eager step's K/V; storage rows past the bucket: untouched
    torch.testing.assert_close(cache._keys[:, :batch], eager_cache._keys[:, :batch], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache._values[:, :batch], eager_cache._values[:, :batch], rtol=1e-6, atol=1e-6)
    assert torch.equal(cache._keys[:, bucket:], before._keys[:, bucket:])
    assert torch.equal(cache._values[:, bucket:], before._values[:, bucket:])
    # padded rows (free storage) were written at slots [0, num_new) only; nothing is committed
    if bucket > batch:
        assert not torch.equal(cache._keys[:, batch:bucket, :, :layout.num_new],
                               before._keys[:, batch:bucket, :, :layout.num_new])
        assert torch.equal(cache._keys[:, batch:bucket, :, layout.num_new:],
                           before._keys[:, batch:bucket, :, layout.num_new:])
    assert cache.host_lengths == lengths and cache.lengths.tolist() == lengths
    assert (forward.captures, forward.replays) == (1, 1)


def test_padded_rows_of_a_replayed_graph_write_from_slot_0():
    """A row that left a bucket's graph is a padded row at the next replay: past length 0, so its
    free storage row is written at slots [0, num_new) (not after the length it had)."""
    model = make_model()
    layout = Layout.decode(2)
    cache = filled_cache(model, [20, 30, 40, 50], max_rows=4)
    forward = GraphedForward(model, capture=call_directly)
    generator = torch.Generator().manual_seed(6)
    forward(torch.randint(3, VOCAB, (4, layout.num_new), generator=generator), layout, cache)
    cache.remove_rows([3])
    before = clone_cache(cache)
    forward(torch.randint(3, VOCAB, (3, layout.num_new), generator=generator), layout, cache)
    assert (forward.captures, forward.replays) == (1, 2)
    written = (cache._keys != before._keys)[0, 3].any(dim=0).any(dim=-1)  # layer 0, storage row 3: per slot
    assert written.nonzero().flatten().tolist() == list(range(layout.num_new))


# ---------------------------------------------------------------- whole decode runs
def run_with_joins(backend, shapes=((4, None), (0, None), (8, 2), (2, 1)), max_rows=8) -> tuple[list[list[int]], int]:
    """Greedy decoding of rows that join and leave (different lengths) while the draft shape
    (b, k) changes every few steps. Returns each request's tokens and the number of decode steps."""
    engine = DecodeEngine(backend, draft_len=shapes[0][0], max_rows=max_rows, max_len=160)
    pending = [Request(p, 12 + 7 * (i % 3), eos_ids=(), request_id=i) for i, p in enumerate(prompts(7))]
    tokens: dict[int, list[int]] = {}
    steps = 0

    def take(deltas):
        for delta in deltas:
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)

    take(engine.add(pending[:3]))
    pending = pending[3:]
    while engine.rows or pending:
        if pending and (steps % 3 == 1 or not engine.rows):  # one joins every third step
            take(engine.add(pending[:1]))
            pending = pending[1:]
        engine.set_draft_len(*shapes[(steps // 4) % len(shapes)])
        if engine.rows:
            take(engine.step())
            steps += 1
    return [tokens[i] for i in sorted(tokens)], steps


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_graphed_decoding_gives_the_eager_tokens(attention):
    model = make_model(attention)
    expected, steps = run_with_joins(TorchBackend(model))
    backend = graphed(model)
    got, graphed_steps = run_with_joins(backend)
    assert got == expected
    assert graphed_steps == steps and backend.graphs.replays == steps  # every decode step, no prefill
    assert 1 < backend.graphs.captures < steps  # one per (bucket, layout) met, then replays


def test_graphs_of_a_grown_cache_are_captured_again():
    """A cache that grows (no max_rows: sized by the first requests) gets new storage; a graph of
    the old storage would write the new K/V there. Tokens stay the eager ones."""
    model = make_model()
    requests = lambda: [Request(p, 20, eos_ids=()) for p in prompts(5, seed=4)]  # noqa: E731

    def run(backend):
        engine = DecodeEngine(backend, draft_len=3)
        first = requests()
        engine.add(first[:1])
        for _ in range(3):
            engine.step()
        engine.add(first[1:])  # the cache grows from 1 row to 8
        assert engine.cache.allocations == 2
        out = {}
        while engine.rows:
            for delta in engine.step():
                out.setdefault(delta.request_id, []).extend(delta.token_ids)
        return out, engine

    backend = graphed(model)
    (got, engine), (expected, _) = run(backend), run(TorchBackend(model))
    assert got == expected
    entry = backend.graphs._caches[engine.cache]  # on the cache's second storage
    assert entry.allocation == 2
    assert {bucket for bucket, _, _ in entry.graphs} <= set(batch_buckets(5))  # keys: (bucket, layout, KV slots)
    assert (5, Layout.decode(3)) in {key[:2] for key in entry.graphs}
    assert backend.graphs.captures == 1 + len(entry.graphs)  # the first storage's one graph was dropped


def test_grow_drops_the_old_graphs():
    model = make_model()
    forward = GraphedForward(model, capture=call_directly)
    cache = filled_cache(model, [5, 9], max_rows=2)
    layout = Layout.decode(2)
    ids = torch.randint(3, VOCAB, (2, layout.num_new), generator=torch.Generator().manual_seed(5))
    forward(ids, layout, cache)
    forward(ids, layout, cache)
    assert (forward.captures, forward.replays) == (1, 2)
    cache.grow(4, 128)
    eager = clone_cache(cache)
    got = forward(ids, layout, cache)
    assert forward.captures == 2 and list(forward._caches[cache].graphs) == [(2, layout, 128)]  # 128 slots: one KV bucket
    with torch.inference_mode():
        expected = model.hidden_states(ids, layout, eager)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache._keys, eager._keys, rtol=1e-6, atol=1e-6)  # written to the new storage


def test_a_collected_cache_takes_its_graphs_along():
    model = make_model()
    forward = GraphedForward(model, capture=call_directly)
    cache = filled_cache(model, [5], max_rows=1)
    forward(torch.zeros(1, 1, dtype=torch.long), Layout.decode(0), cache)
    assert len(forward._caches) == 1
    del cache
    assert len(forward._caches) == 0


def test_a_model_change_drops_every_graph_and_unsupported_attention_is_named():
    model = make_model("eager")
    forward = GraphedForward(model, capture=call_directly)
    cache = filled_cache(model, [5], max_rows=1)
    ids = torch.zeros(1, 1, dtype=torch.long)
    forward(ids, Layout.decode(0), cache)
    model.set_attention("sdpa")
    forward(ids, Layout.decode(0), cache)
    assert forward.captures == 2
    model.to(torch.float64)  # new weight storage
    forward(ids, Layout.decode(0), model.new_cache(1, 8))
    assert forward.captures == 3
    model.set_attention("flex")
    with pytest.raises(ValueError, match="cuda_graphs: attention 'flex'"):
        forward(ids, Layout.decode(0), cache)
    with pytest.raises(ValueError, match="cuda_graphs: attention 'flex'"):
        GraphedForward(model, capture=call_directly)


# ---------------------------------------------------------------- the option
def test_graphs_are_off_on_a_cpu_and_refused_there_by_name():
    model = make_model()
    assert TorchBackend(model).graphs is None
    assert TorchBackend(model, cuda_graphs=False).graphs is None
    with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need the model on a CUDA device; it is on cpu"):
        TorchBackend(model, cuda_graphs=True)


@pytest.mark.parametrize("args, message", [
    (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    (["--device", "cuda:7"], "--device cuda:7: no such CUDA device" if torch.cuda.device_count() < 8 else None),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--backend", "onnxruntime", "--no-cuda-graphs"], "options of the torch backend"),
])
def test_generate_refuses_cuda_graphs_where_they_cannot_run(tiny_checkpoints, capsys, args, message):
    if message is None:
        pytest.skip(f"cuda:7 exists on this machine ({torch.cuda.device_count()} CUDA devices), so it is not refused")
    assert main(["generate", str(tiny_checkpoints["qwen2"]), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tidar generate: error:") and message in err and "Traceback" not in err


def test_generate_without_cuda_graphs_on_a_cpu(tiny_checkpoints, capsys):
    assert main(["generate", str(tiny_checkpoints["qwen2"]), "--prompt", "x", "--max-new-tokens", "4",
                 "--draft-len", "2", "--no-cuda-graphs", "--device", "cpu"]) == 0
    assert "finish:" in capsys.readouterr().err


def test_serving_parameter(tmp_path):
    assert ServingOptions.from_parameters({}).cuda_graphs is None
    assert ServingOptions.from_parameters({"cuda_graphs": "auto"}).cuda_graphs is None
    assert ServingOptions.from_parameters({"cuda_graphs": "true"}).cuda_graphs is True
    assert ServingOptions.from_parameters({"cuda_graphs": "False"}).cuda_graphs is False
    with pytest.raises(ValueError, match="parameter 'cuda_graphs' has an invalid value 'yes'"):
        ServingOptions.from_parameters({"cuda_graphs": "yes"})
    repo = render_repository(tmp_path / "gpu", model_dir="../..", backend="torch", instance_kind="KIND_GPU",
                             cuda_graphs="true")
    assert 'key: "cuda_graphs" value: { string_value: "true" }' in (repo / "tidar" / "config.pbtxt").read_text()
    default = render_repository(tmp_path / "default", model_dir="../..")
    assert 'key: "cuda_graphs" value: { string_value: "auto" }' in (default / "tidar" / "config.pbtxt").read_text()
    with pytest.raises(RenderError, match="cuda_graphs 'true' needs instance_kind KIND_GPU"):
        render_repository(tmp_path / "cpu", model_dir="../..", backend="torch", cuda_graphs="true")
    with pytest.raises(RenderError, match="serving option 'cuda_graphs' has an invalid value 'on'"):
        render_repository(tmp_path / "bad", model_dir="../..", cuda_graphs="on")


# ---------------------------------------------------------------- on CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cuda_graphs_give_the_eager_tokens_on_cuda(attention):
    """Real graphs: the same greedy tokens as the eager CUDA backend over rows joining and leaving
    and draft-length changes (fp32, TF32 off), every decode step a replay, few captures."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_model(attention).to("cuda")
    eager = TorchBackend(model, cuda_graphs=False)
    backend = TorchBackend(model, cuda_graphs=True)
    assert eager.graphs is None and backend.graphs is not None
    assert TorchBackend(model).graphs is not None  # on by default on CUDA
    expected, steps = run_with_joins(eager)
    got, graphed_steps = run_with_joins(backend)
    assert got == expected
    assert backend.graphs.replays == graphed_steps == steps
    assert 1 < backend.graphs.captures < steps
    again, _ = run_with_joins(backend)  # a new engine, a new cache: captured again, same tokens
    assert again == expected


@needs_cuda
def test_cuda_graphs_replay_with_the_triton_kernel():
    model = make_model("triton").to("cuda")
    expected, steps = run_with_joins(TorchBackend(model, cuda_graphs=False))
    backend = TorchBackend(model, cuda_graphs=True)
    got, _ = run_with_joins(backend)
    assert got == expected and backend.graphs.replays == steps

"""The decode step's shape: one device->host transfer per step, and a KV cache that
is allocated once while rows join and leave and the draft length changes.

Host transfers are counted by wrapping every tensor->Python conversion (item, tolist, int,
bool, float, index, numpy, cpu) during `step()` of greedy and sampled batches of 8 rows on
CPU, where each would be a blocking device->host copy on a GPU. Before this design a greedy
step made about 30 and a sampled one about 90 (docs/design.md §3.2, §3.6).
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.model import TiDARModel
from tidar.runtime.sampling import SamplingParams
from tidar.train.checkpoint import init_random_weights, tiny_config

CONVERSIONS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "numpy", "cpu")


@pytest.fixture(scope="module")
def backend():
    model = TiDARModel(tiny_config("qwen2", 512, block_size=8, num_hidden_layers=4)).eval()
    init_random_weights(model, seed=0)
    return TorchBackend(model)


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (10 + 3 * i,), generator=generator).tolist() for i in range(count)]


def count_conversions(monkeypatch, call) -> collections.Counter:
    counts = collections.Counter()
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def wrapper(*args, __original=original, __name=name, **kwargs):
            counts[__name] += 1
            return __original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    call()
    monkeypatch.undo()
    return counts


PROCESSORS = dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2, min_tokens=40,
                  bad_words=((7,), (9, 10)))


@pytest.mark.parametrize("mode", ["greedy", "sampled", "mixed", "processors"])
@pytest.mark.parametrize("draft_len", [0, 4])
def test_one_host_transfer_per_step(backend, monkeypatch, mode, draft_len):
    """`processors`: penalties, min_tokens and bad words on half the rows, log probs on a
    quarter (runtime/logits_processor.py): still one transfer."""
    settings = {"greedy": [SamplingParams()],
                "sampled": [SamplingParams(temperature=1.0, top_p=0.9, seed=0)],
                "mixed": [SamplingParams(), SamplingParams(temperature=0.7, top_k=40, seed=1)],
                "processors": [SamplingParams(temperature=0.9, seed=0, **PROCESSORS), SamplingParams(),
                               SamplingParams(**PROCESSORS), SamplingParams(temperature=0.7, top_k=40, seed=1)]}[mode]
    engine = DecodeEngine(backend, draft_len=draft_len)
    engine.add([Request(p, 64, params, eos_ids=(0,) if mode == "processors" else (),
                        return_log_probs=mode == "processors" and i % 4 == 0)
                for i, (p, params) in enumerate(zip(prompts(8), itertools.cycle(settings)))])
    assert (engine.batch.processor is not None) == engine.batch.wants_log_probs == (mode == "processors")
    engine.step()  # warm-up
    for _ in range(3):
        counts = count_conversions(monkeypatch, engine.step)
        assert sum(counts.values()) <= 1, dict(counts)


def test_cache_storage_is_allocated_once(backend):
    """With max_rows and max_len the storage is allocated at the first add and never again:
    rows join (at several steps) and leave (each at its own length), the draft length changes."""
    engine = DecodeEngine(backend, draft_len=4, max_rows=6, max_len=160)
    pending = [Request(p, n, eos_ids=()) for p, n in zip(prompts(10), (5, 30, 9, 17, 3, 25, 12, 8, 20, 6))]
    finished = sum(d.finished for d in engine.add(pending[:3]))
    cache = engine.cache
    storage = (cache._keys.data_ptr(), cache._values.data_ptr())
    sizes, lengths = set(), itertools.cycle((4, 8, 0, 2, 6))
    while engine.rows or pending[3:]:
        room = 6 - len(engine.rows)
        joining, pending[3:] = pending[3:3 + room], pending[3 + room:]
        finished += sum(d.finished for d in engine.add(joining))
        sizes.add(len(engine.rows))
        engine.set_draft_len(next(lengths))
        finished += sum(d.finished for d in engine.step())
    assert finished == 10 and len(sizes) >= 3
    assert engine.cache is cache and cache.allocations == 1
    assert (cache._keys.data_ptr(), cache._values.data_ptr()) == storage
    with pytest.raises(Exception, match="max_len"):
        engine.add([Request(prompts(1)[0], 200)])


def count_head_rows(backend, monkeypatch) -> list[int]:
    rows: list[int] = []
    head = backend.model.lm_head
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda x: rows.append(x[..., 0].numel()) or original(x))
    return rows


@pytest.mark.parametrize("draft_len,beta", [(0, 1.0), (1, 1.0), (4, 1.0), (8, 1.0), (8, 0.5)])
def test_lm_head_runs_only_on_the_rows_it_needs(backend, monkeypatch, draft_len, beta):
    """Per step and row: 2b - 1 rows (the b verification rows, then the b - 1 masks of the
    selected block), 3b - 1 with beta < 1 (plus the first mask of each block); AR: 1. Down from
    b(b+1). Prefill: 1 row for d_0 (2 with beta < 1) and b - 1 drafts."""
    rows = count_head_rows(backend, monkeypatch)
    engine = DecodeEngine(backend, draft_len=draft_len, beta=beta)
    engine.add([Request(p, 40, eos_ids=()) for p in prompts(8)])
    b = draft_len
    mixed = b > 0 and beta < 1
    assert rows == [1 + mixed + max(b - 1, 0)] * 8
    rows.clear()
    engine.step()
    per_row = {0: 1, 1: 1 + mixed}.get(b, (3 * b - 1) if mixed else (2 * b - 1))
    assert sum(rows) == 8 * per_row


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_row_selected_logits_stay_lossless(family, tiny_backends, hf_models):
    """I1 through the row-selecting path itself (the I1 tests of test_decode_invariants wrap the
    backend and take every row's logits): batched greedy TiDAR equals transformers greedy."""
    backend, hf = tiny_backends[family], hf_models[family]
    generator = torch.Generator().manual_seed(4)
    batch = [torch.randint(3, backend.config.vocab_size, (n,), generator=generator).tolist() for n in (3, 9, 17)]
    expected = []
    for prompt in batch:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    for draft_len in (2, 5, 16):
        results = DecodeEngine(backend, draft_len=draft_len).generate([Request(p, 24, eos_ids=()) for p in batch])
        assert [r.token_ids for r in results] == expected, f"b={draft_len}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the decode step on the GPU)")
@pytest.mark.parametrize("draft_len", [0, 4])
def test_decode_on_cuda_equals_cpu(backend, draft_len):
    """R1: every tensor of the step lives on the logits' device. Greedy and seeded sampled
    batches, with and without logits processors, on CUDA give the CPU's tokens (fp32; the noise
    is the same integer hash on both)."""
    cuda = TorchBackend(TiDARModel(backend.config).eval())
    cuda.model.load_state_dict(backend.model.state_dict())
    cuda.model.to("cuda")
    settings = [SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1.0, top_p=0.9,
                                                                                          top_k=50, seed=4),
                SamplingParams(temperature=0.9, seed=5, **PROCESSORS)]
    requests = [Request(p, 32, params, eos_ids=(0,), return_log_probs=i % 2 == 1)
                for i, (p, params) in enumerate(zip(prompts(8), itertools.cycle(settings)))]
    expected = DecodeEngine(backend, draft_len=draft_len).generate(requests)
    got = DecodeEngine(cuda, draft_len=draft_len).generate(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    for mine, theirs in zip(got, expected):  # log probs: the same within fp32 round-off
        assert (mine.log_probs is None) == (theirs.log_probs is None)
        assert mine.log_probs is None or mine.log_probs == pytest.approx(theirs.log_probs, abs=1e-4)

"""Seeded sampling is a function of (model, prompt, sampling settings, seed) alone (docs/design.md §3.5).

Oracle: the same request decoded alone by AR (draft length 0). The same seed must give the same
tokens for draft lengths 0, 1, 4, 8 and 16, for draft shapes (b, k) with k < b blocks, with the
draft length changing between steps, and in batches of other requests (greedy and sampled, other seeds) that join at different steps
and leave as they finish. The ONNX Runtime backend is checked in test_onnx.py. A deliberately
broken variant, whose noise is keyed by the step (the call) instead of the absolute position,
is caught by the same comparison.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tidar.runtime import sampling as sampling_module
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.sampling import SamplingParams, gumbel_noise

PROMPTS = ([5, 17, 42], [9] * 12 + [300, 301], [77])
SEEDED = (SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=1.0, top_p=0.9, seed=123),
          SamplingParams(temperature=0.6, top_k=20, seed=2 ** 64 - 1))
NEW_TOKENS = 24


def solo(backend, prompt, params, draft_len, draft_blocks=None):
    engine = DecodeEngine(backend, draft_len=draft_len, draft_blocks=draft_blocks)
    return engine.generate([Request(prompt, NEW_TOKENS, params, eos_ids=())])[0].token_ids


def draft_lengths_agree(backend) -> bool:
    for prompt, params in zip(PROMPTS, SEEDED):
        reference = solo(backend, prompt, params, 0)
        if any(solo(backend, prompt, params, b) != reference for b in (1, 4, 8, 16)):
            return False
    return True


def test_same_seed_same_tokens_for_every_draft_length(tiny_backends):
    backend = tiny_backends["qwen2"]
    assert draft_lengths_agree(backend)
    # the seed matters: another seed, other tokens
    assert solo(backend, PROMPTS[0], SamplingParams(temperature=0.8, seed=8), 4) != \
        solo(backend, PROMPTS[0], SEEDED[0], 4)


def test_same_seed_same_tokens_for_every_draft_shape(tiny_backends):
    """Pre-drafting k of b outcomes (docs/design.md §3.4) changes which proposals exist, never
    the seeded output: (b, k) = (4, 1), (8, 2), (16, 1), (16, 4) give the AR tokens."""
    backend = tiny_backends["qwen3"]
    for prompt, params in zip(PROMPTS, SEEDED):
        reference = solo(backend, prompt, params, 0)
        for b, k in ((4, 1), (8, 2), (16, 1), (16, 4)):
            assert solo(backend, prompt, params, b, k) == reference, (b, k, params)


def test_same_seed_same_tokens_in_mixed_batches_joining_at_different_steps(tiny_backends):
    """Rows (sampled with several settings, greedy, unseeded) join a running batch at steps 0, 1
    and 3 while the draft length changes before every step; each seeded row equals its solo AR
    decoding and each greedy row its solo greedy decoding."""
    backend = tiny_backends["llama"]
    requests = [Request(p, NEW_TOKENS, params, eos_ids=(), request_id=i)
                for i, (p, params) in enumerate(itertools.product(PROMPTS[:2], SEEDED + (SamplingParams(),)))]
    requests.append(Request(PROMPTS[2], NEW_TOKENS, SamplingParams(temperature=1.0), eos_ids=(), request_id="free"))
    joins = {0: requests[:3], 1: requests[3:6], 3: requests[6:]}
    engine = DecodeEngine(backend, draft_len=4)
    lengths = itertools.cycle((4, 16, 0, 1, 8, 2))
    step, deltas = 0, []
    while engine.rows or step <= max(joins):
        deltas += engine.add(joins.get(step, []))
        engine.set_draft_len(next(lengths))
        deltas += engine.step()
        step += 1
    results = {d.request_id: d.result.token_ids for d in deltas if d.finished}
    assert len(results) == len(requests)
    for request in requests[:-1]:
        assert results[request.request_id] == solo(backend, list(request.prompt_ids), request.sampling, 0)


def test_noise_keyed_by_step_is_caught(tiny_backends, monkeypatch):
    """The broken variant: noise keyed by (call number, offset in the call) instead of the absolute
    position. Outputs then depend on the draft length, and the comparison above says so."""
    calls = itertools.count()

    def keyed_by_step(keys, positions, vocab):
        step = next(calls)
        offsets = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        return gumbel_noise(keys, offsets + 1000 * step, vocab)

    monkeypatch.setattr(sampling_module, "gumbel_noise", keyed_by_step)
    assert not draft_lengths_agree(tiny_backends["qwen2"])


@pytest.mark.parametrize("draft_len", [0, 4])
def test_unseeded_requests_differ_between_runs(tiny_backends, draft_len):
    """A request without a seed gets one drawn at admission: two runs differ."""
    backend = tiny_backends["qwen3"]
    params = SamplingParams(temperature=1.0)
    assert solo(backend, PROMPTS[0], params, draft_len) != solo(backend, PROMPTS[0], params, draft_len)

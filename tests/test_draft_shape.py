"""The draft shape (b, k) chosen by measurement (runtime/autotune.py, docs/design.md §3.4).

- `expected_tokens` for k = b is the closed form 1 + sum P(d_1..d_i accepted); for k < b it is
  the long-run mean of a step-by-step simulation written here from the design's words (block a
  after a <= k committed, else block k's masks at positions after the new d_0), under the
  model the autotuner states: a proposal's acceptance depends on its mask index in its block.
- Candidates, names and query tokens of shapes; the batch policy picks shapes by expected
  tokens per second and survives its JSON round trip (old caches with draft-length keys too).
- Trained shapes only (runtime/draft_shape.py): a checkpoint decodes with blocks of its trained
  sizes (k-of-b included) or AR; an untrained or malformed shape is refused naming the value, by
  the one function the engine, the CLI and the serving contract call.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from tidar.runtime import autotune
from tidar.runtime.autotune import BatchDraftPolicy, as_shape, draft_shapes, expected_tokens
from tidar.runtime.draft_shape import DraftShapeError, trained_block_sizes, trained_shapes, validate_draft_shape


def simulated_tokens_per_step(conditional: list[float], b: int, k: int, steps: int, seed: int) -> float:
    """Mean committed tokens per step over `steps` steps. conditional[m-1]: P(the proposal of mask
    m is accepted | the ones before it were). Positions are offsets from the step's d_0."""
    rng = random.Random(seed)
    proposal_masks = list(range(1, b))  # after the prefill: masks 1..b-1 of one block
    total = 0
    for _ in range(steps):
        accepted = 0
        for mask in proposal_masks:
            if rng.random() >= conditional[mask - 1]:
                break
            accepted += 1
        committed = accepted + 1
        total += committed
        if committed <= k:  # block `committed` sees d_0..d_{committed-1}; the new d_0 is its mask 0
            proposal_masks = list(range(1, b))
        else:  # block k (masks at offsets k + m): the masks after the new d_0 at offset `committed`
            proposal_masks = [m for m in range(b) if k + m > committed]
    return total / steps


def acceptance_of(conditional: list[float]) -> list[float]:
    out, run = [], 1.0
    for c in conditional:
        run *= c
        out.append(run)
    return out


CONDITIONAL = [0.45, 0.7, 0.8, 0.6, 0.9, 0.5, 0.85, 0.7, 0.95, 0.6, 0.75, 0.8, 0.9, 0.5, 0.7]


@pytest.mark.parametrize("b,k", [(2, 1), (4, 1), (4, 2), (4, 3), (8, 1), (8, 3), (16, 2), (16, 5)])
def test_expected_tokens_equals_the_simulated_long_run(b, k):
    acceptance = acceptance_of(CONDITIONAL)
    expected = expected_tokens(acceptance, b, k)
    simulated = simulated_tokens_per_step(CONDITIONAL, b, k, steps=200_000, seed=b * 100 + k)
    assert expected == pytest.approx(simulated, rel=0.01), (expected, simulated)
    assert 1.0 <= expected <= b


def test_expected_tokens_when_every_draft_is_accepted():
    """Acceptance 1: k = b commits b per step; k < b alternates b and k (the steps after a full
    run have only k - 1 proposals), so (b + k) / 2 per step."""
    acceptance = [1.0] * 15
    assert expected_tokens(acceptance, 16) == pytest.approx(16)
    assert expected_tokens(acceptance, 16, 2) == pytest.approx(9)
    assert expected_tokens(acceptance, 8, 1) == pytest.approx(4.5)


def test_expected_tokens_k_equals_b_is_the_closed_form():
    acceptance = acceptance_of(CONDITIONAL)
    for b in range(0, 17):
        assert expected_tokens(acceptance, b) == pytest.approx(1 + sum(acceptance[:max(b - 1, 0)]))
        assert expected_tokens(acceptance, b, b) == pytest.approx(expected_tokens(acceptance, b))
    assert expected_tokens([0.0] * 15, 8, 2) == pytest.approx(1.0)


def test_shapes_names_and_query_tokens():
    assert draft_shapes([0, 1, 2, 4]) == [(0, 0), (1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]
    assert draft_shapes([3], blocks=()) == [(3, 3)]
    assert [autotune.shape_name(s) for s in [(0, 0), 4, (16, 2)]] == ["ar", "b4k4", "b16k2"]
    assert [autotune.query_tokens(s) for s in [0, (4, 1), 16, (16, 2)]] == [1, 8, 272, 48]
    assert as_shape(5) == (5, 5) and as_shape((5, 2)) == (5, 2)
    with pytest.raises(ValueError, match="draft_blocks"):
        as_shape((4, 5))


def test_policy_chooses_shapes_and_round_trips_through_json():
    acceptance = [0.5, 0.3, 0.2]
    table = {1: {0: 1.0, 4: 2.0, (4, 1): 1.3, (4, 2): 1.6}, 8: {0: 1.0, 4: 6.0, (4, 1): 1.9, (4, 2): 3.0}}
    policy = BatchDraftPolicy(acceptance, table)
    rates = {c: expected_tokens(acceptance, *as_shape(c)) / s for c, s in table[1].items()}
    assert policy.best(1) == max(rates, key=rates.get) == (4, 1)
    assert policy.best(8) == 0  # with 8 rows no draft shape pays
    again = BatchDraftPolicy.from_json(policy.to_json())
    assert {batch: {as_shape(c): s for c, s in row.items()} for batch, row in again.step_seconds.items()} == \
        {batch: {as_shape(c): s for c, s in row.items()} for batch, row in table.items()}
    assert as_shape(again.best(1)) == (4, 1)
    old_cache = {"acceptance": acceptance, "step_seconds": {"1": {"0": 1.0, "4": 1.1}}}  # before shapes: keys are b
    assert BatchDraftPolicy.from_json(old_cache).step_seconds == {1: {0: 1.0, 4: 1.1}}


# ---------------------------------------------------------------------------- trained shapes only
def released_like_config(**tidar):
    """A config of the block size 16 checkpoints: trained on blocks of 16 unless `tidar` says otherwise."""
    from tidar.train.checkpoint import tiny_config

    return dataclasses.replace(tiny_config("qwen3", 512, block_size=16), **{"trained_block_sizes": (16,), **tidar})


@pytest.mark.parametrize("b,k", [(0, None), (0, 0), (16, None), (16, 1), (16, 5), (16, 16)])
def test_trained_size_and_k_of_b_shapes_are_allowed(b, k):
    assert validate_draft_shape(released_like_config(), b, k) == (b, b if k is None else k)


@pytest.mark.parametrize("b", [1, 4, 8, 15])
def test_an_untrained_size_is_refused_by_name(b):
    with pytest.raises(DraftShapeError) as caught:
        validate_draft_shape(released_like_config(), b, 1, names=("--draft-len", "--draft-blocks"))
    message = str(caught.value)
    assert message.startswith(f"--draft-len {b}: this checkpoint was trained on blocks of 16 masks only")
    assert "tidar.trained_block_sizes = [16]" in message and "--draft-len 16" in message and "0 (AR)" in message


def test_declared_sizes_are_allowed_and_others_refused():
    config = released_like_config(trained_block_sizes=(4, 8, 16))
    assert [validate_draft_shape(config, b)[0] for b in (0, 4, 8, 16)] == [0, 4, 8, 16]
    with pytest.raises(DraftShapeError, match=r"draft_len 6: this checkpoint was trained on blocks of 4, 8, 16 masks"):
        validate_draft_shape(config, 6)
    assert trained_shapes(config, [0, 2, 4, (4, 2), (6, 1), (8, 1), 16, (16, 3)]) == [0, 4, (4, 2), (8, 1), 16,
                                                                                       (16, 3)]


@pytest.mark.parametrize("b,k,needle", [(17, None, "draft_len must be an integer in [0, block_size = 16]"),
                                        (-1, None, "got -1"), (True, None, "got True"), (4.0, None, "got 4.0"),
                                        (16, 0, "draft_blocks must be in [1, draft_len = 16], got 0"),
                                        (16, 17, "got 17"), (0, 1, "draft_blocks must be in [0, draft_len = 0]"),
                                        (16, 2.0, "draft_blocks must be an integer, got 2.0")])
def test_malformed_shapes_are_refused_by_value(b, k, needle):
    with pytest.raises(DraftShapeError) as caught:
        validate_draft_shape(released_like_config(trained_block_sizes=tuple(range(1, 17))), b, k)
    assert needle in str(caught.value)


def test_the_engine_and_the_serving_contract_refuse_untrained_sizes(tiny_backends, tiny_checkpoints):
    """`DecodeEngine` (construction and `set_draft_len`) and the Triton request contract ask the
    same function; a config that declares no sizes allows its block size only."""
    from tidar.runtime.generate import DecodeEngine, RequestError
    from tidar.runtime.tokenizer import Tokenizer
    from tidar.serving.requests import parse_request
    from tidar.serving.wire import request_arrays

    backend = tiny_backends["qwen2"]
    config = backend.config
    assert trained_block_sizes(config) == tuple(range(1, 17))  # random weights allow every size
    restricted = dataclasses.replace(config, trained_block_sizes=(16,))
    backend_config, backend.config = backend.config, restricted
    try:
        with pytest.raises(RequestError, match="draft_len 4: this checkpoint was trained on blocks of 16"):
            DecodeEngine(backend, draft_len=4)
        engine = DecodeEngine(backend, draft_len=16, draft_blocks=2)
        with pytest.raises(RequestError, match="draft_len 8: "):
            engine.set_draft_len(8, 1)
        engine.set_draft_len(0)
        assert (engine.draft_len, engine.draft_blocks) == (0, 0)
    finally:
        backend.config = backend_config
    assert trained_block_sizes(dataclasses.replace(config, trained_block_sizes=())) == (16,)
    tokenizer = Tokenizer(tiny_checkpoints["qwen2"])
    arrays = {**request_arrays("def main():", 8), "draft_len": np.asarray([4], dtype=np.int32)[None]}
    assert parse_request(arrays, tokenizer, config, 100).draft_len == 4
    with pytest.raises(RequestError, match="input 'draft_len' 4: this checkpoint was trained on blocks of 16"):
        parse_request(arrays, tokenizer, restricted, 100)

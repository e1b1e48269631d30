"""Greedy replay (runtime/replay.py, docs/design.md §3.4) and the autotuner's use of it.

- The oracle: on the bundled model the replayed steps, tokens and acceptance counters of a shape
  (b, k) equal, integer for integer, what `DecodeEngine` counts on the same prompts in greedy
  fp32 at batch 1 (as `tidar bench` runs it), for k = b and k < b.
- D_b(p) (`block_drafts`) equals the proposals a real engine holds after its prefill and after
  each step, located by the design's rule written out here (block a after a <= k committed,
  else block k's masks after the new d_0).
- `simulate` on hand-made drafts: perfect drafts commit b, k, b, k, ... (k < b); wrong ones 1.
- The autotuner: replayed tokens per step decide where they exist, the Markov estimate
  elsewhere; the policy's JSON keeps them; old acceptance.json and old policy caches still load;
  `tidar generate --draft-len auto` and the server's start-up policy read them from
  acceptance.json; `tidar bench --write-acceptance` writes replayed values equal to its own
  measured tokens per step.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tidar import BUNDLED_MODEL
from tidar.runtime.bench import heldout_prompts
from tidar.runtime import autotune, replay
from tidar.runtime.autotune import BatchDraftPolicy, expected_tokens, expected_tokens_per_step
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def bundled():
    """(backend in fp32 with sdpa attention, as `tidar bench` loads it; 3 held-out prompts)."""
    backend = TorchBackend.load(BUNDLED_MODEL, dtype="float32", attention="sdpa")
    return backend, heldout_prompts(BUNDLED_MODEL, Tokenizer(BUNDLED_MODEL), 3, 64)


def engine_counts(backend, prompts, b, k):
    """The engine's counters at (b, k), one request at a time: (tokens, decode steps, accepted
    per position, proposed per position, outputs)."""
    engine = DecodeEngine(backend, draft_len=b, draft_blocks=k)
    tokens = steps = 0
    accepted, proposed, outputs = [0] * (b - 1), [0] * (b - 1), []
    for prompt in prompts:
        result = engine.generate([Request(prompt, NEW_TOKENS, eos_ids=())])[0]
        outputs.append(result.token_ids)
        tokens += len(result.token_ids)
        steps += result.stats.forward_passes - 1
        accepted = [a + c for a, c in zip(accepted, result.stats.accepted_per_position)]
        proposed = [a + c for a, c in zip(proposed, result.stats.proposed_per_position)]
    return tokens, steps, accepted, proposed, outputs


SHAPES = [(4, 1), (4, 4), (8, 2), (16, 1), (16, 16)]


def test_replay_counts_equal_the_engines(bundled):
    backend, prompts = bundled
    replayed = replay.replay(backend, prompts, NEW_TOKENS, SHAPES)
    continuations = replay.greedy_continuations(backend, prompts, NEW_TOKENS)
    accepted_any = 0
    for b, k in SHAPES:
        tokens, steps, accepted, proposed, outputs = engine_counts(backend, prompts, b, k)
        counts = replayed[(b, k)]
        assert outputs == continuations  # I1: the replay's x is the engine's output
        assert (counts.prompts, counts.tokens, counts.decode_steps) == (len(prompts), tokens, steps), (b, k)
        assert counts.accepted_per_position == accepted and counts.proposed_per_position == proposed, (b, k)
        assert counts.tokens_per_step == (tokens - len(prompts)) / steps
        accepted_any += sum(accepted)
    assert accepted_any > 0  # the drafts are partly right: the comparison is not all-rejects
    assert replayed[(4, 1)].tokens_per_step != replayed[(4, 4)].tokens_per_step


def expected_source(prompt_len: int, d0_index: int, committed: int, b: int, k: int) -> tuple[int, int, int]:
    """Design §3.4, from its words: after a step whose d_0 is output token `d0_index` committed a
    tokens, the proposals are block a's masks 1..b-1 (a <= k) or block k's masks a-k+1..b-1
    (a > k); block j's masks start at the position of d_0 plus j. Returns (position of the
    block's mask 0, first mask, count)."""
    L = prompt_len + d0_index
    if committed <= k:
        return L + committed, 1, b - 1
    return L + k, committed - k + 1, b - 1 - (committed - k)


@pytest.mark.parametrize("b,k", [(8, 2), (4, 1)])
def test_block_drafts_are_the_engines_proposals(bundled, b, k):
    backend, prompts = bundled
    prompt = prompts[0]
    x = replay.greedy_continuations(backend, [prompt], NEW_TOKENS + b)[0]
    drafts = replay.block_drafts(backend, prompt + x, len(prompt), NEW_TOKENS, b)
    engine = DecodeEngine(backend, draft_len=b, draft_blocks=k)
    engine.add([Request(prompt, NEW_TOKENS, eos_ids=())])
    assert engine.batch.drafts[0, 1:].tolist() == drafts[0, 1:].tolist()  # the prefill's block is D_b(len(prompt))
    emitted, shifted = 1, 0
    while engine.rows:
        d0_index = emitted - 1
        delta = engine.step()[0]
        if delta.finished:
            break
        committed = len(delta.token_ids)
        emitted += committed
        position, first, count = expected_source(len(prompt), d0_index, committed, b, k)
        row = drafts[position - len(prompt)]
        assert engine.batch.drafts[0, 1:1 + count].tolist() == row[first:first + count].tolist(), (d0_index, committed)
        assert int(engine.batch.proposal_counts[0]) == count
        shifted += first > 1
    assert shifted > 0  # some step committed more than k: the shifted case was checked


def test_simulate_with_perfect_and_wrong_drafts():
    """Perfect drafts (every mask equals x at its position): k = b commits b per step; k < b
    alternates b (shift 0) and k (the k - 1 proposals after the shift), as design §3.4 says.
    Wrong drafts: one token per step."""
    b, k, rounds = 4, 1, 5
    x = list(range(100, 100 + 2 * (b + k) * rounds + b))
    perfect = [x[t:t + b] for t in range(len(x) - b)]
    new_tokens = 1 + (b + k) * rounds
    counts = replay.simulate(perfect, x, b, k, new_tokens)
    assert (counts.tokens, counts.decode_steps) == (new_tokens, 2 * rounds)
    assert counts.tokens_per_step == pytest.approx(expected_tokens([1.0] * 15, b, k)) == (b + k) / 2
    assert counts.proposed_per_position == [rounds] * (b - 1)  # the shifted steps have k - 1 = 0 proposals
    full = replay.simulate(perfect, x, b, b, 1 + b * rounds)
    assert full.decode_steps == rounds and full.accepted_per_position == [rounds] * (b - 1)
    wrong = [[0] * b for _ in x]
    assert replay.simulate(wrong, x, b, k, 20).decode_steps == 19
    trimmed = replay.simulate(perfect, x, b, b, 3)  # one step commits b = 4, the engine keeps 3
    assert (trimmed.tokens, trimmed.decode_steps) == (3, 1)


# ------------------------------------------------------------------ the autotuner

ACCEPTANCE = [0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02]  # block size 8


def test_expected_tokens_per_step_prefers_the_replay():
    replayed = {"b4k1": 1.2, "b8k8": 1.9}
    assert expected_tokens_per_step(ACCEPTANCE, (4, 1), replayed) == 1.2
    assert expected_tokens_per_step(ACCEPTANCE, 8, replayed) == 1.9
    assert expected_tokens_per_step(ACCEPTANCE, (4, 2), replayed) == expected_tokens(ACCEPTANCE, 4, 2)
    assert expected_tokens_per_step(ACCEPTANCE, 0, replayed) == 1.0
    assert expected_tokens_per_step(ACCEPTANCE, (8, 1), None) == expected_tokens(ACCEPTANCE, 8, 1)


def test_policy_and_choice_use_the_replay_where_they_have_it():
    seconds = {0: 1.0, (4, 1): 1.25, 4: 1.5}
    markov = BatchDraftPolicy(ACCEPTANCE, {1: seconds})
    rates = {c: expected_tokens(ACCEPTANCE, *autotune.as_shape(c)) / s for c, s in seconds.items()}
    assert markov.best(1) == max(rates, key=rates.get) == (4, 1)  # the estimate: 2.0 / 1.25 beats 2.3 / 1.5
    replayed = {"b4k1": 1.2, "b4k4": 2.1}  # measured: b4k1 commits little
    policy = BatchDraftPolicy(ACCEPTANCE, {1: seconds}, replayed)
    assert policy.best(1) == 4
    backend = None  # not read: the candidates and their latencies are given
    choice = autotune.choose_draft_len(backend, ACCEPTANCE, step_seconds=seconds, candidates=list(seconds))
    assert choice.shape == (4, 1)
    choice = autotune.choose_draft_len(backend, ACCEPTANCE, step_seconds=seconds, candidates=list(seconds),
                                       replayed=replayed)
    assert choice.shape == (4, 4) and choice.expected_tokens_per_step[(4, 1)] == 1.2
    again = BatchDraftPolicy.from_json(json.loads(json.dumps(policy.to_json())))
    assert again.replayed == replayed and autotune.as_shape(again.best(1)) == (4, 4)
    old_cache = markov.to_json()  # a cache written before replay has no such field
    assert autotune.REPLAY_FIELD not in old_cache
    assert BatchDraftPolicy.from_json(old_cache).replayed is None
    assert autotune.as_shape(BatchDraftPolicy.from_json(old_cache).best(1)) == (4, 1)


def test_old_and_new_acceptance_files_load(tmp_path):
    old = {"block_size": 8, "acceptance": ACCEPTANCE, "prompts": 8, "measured_by": "tidar bench"}
    (tmp_path / autotune.ACCEPTANCE_FILE).write_text(json.dumps(old))
    assert autotune.load_acceptance(tmp_path, 8) == ACCEPTANCE
    assert autotune.load_replayed(tmp_path, 8) is None
    table = {"b1k1": 1.0, "b4k1": 1.2, "b8k8": 1.9, "b9k1": 3.0, "b4k5": 2.0, "ar": 1.0, "b2k1": "x"}
    (tmp_path / autotune.ACCEPTANCE_FILE).write_text(json.dumps({**old, autotune.REPLAY_FIELD: table}))
    assert autotune.load_acceptance(tmp_path, 8) == ACCEPTANCE
    assert autotune.load_replayed(tmp_path, 8) == {"b1k1": 1.0, "b4k1": 1.2, "b8k8": 1.9}
    assert autotune.load_replayed(tmp_path / "missing", 8) is None


def test_bundled_acceptance_file_has_a_replay_of_every_shape():
    block = TorchBackend.load(BUNDLED_MODEL, dtype="float32").config.block_size
    replayed = autotune.load_replayed(BUNDLED_MODEL, block)
    assert replayed is not None and set(replayed) == {f"b{b}k{k}" for b in range(1, block + 1) for k in range(1, b + 1)}
    assert replayed["b1k1"] == 1.0 and all(1.0 <= v <= int(name[1:].split("k")[0]) for name, v in replayed.items())


@pytest.fixture
def model_with_replay(tiny_checkpoints, tmp_path):
    """A copy of the tiny qwen2 checkpoint whose acceptance.json says drafts are never accepted
    (the Markov estimate: every shape commits 1) but whose replay says b2k1 commits 1.9."""
    folder = shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "model")
    (folder / autotune.ACCEPTANCE_FILE).write_text(json.dumps(
        {"block_size": 16, "acceptance": [0.0] * 15, autotune.REPLAY_FIELD: {"b2k1": 1.9}}))
    return folder


class StepsByQueryTokens:
    """Stands in for `autotune.EngineSteps`: a step costs 1 + 0.1 s per query token per row."""

    def __init__(self, backend, tokenizer=None, batch=1, **_options):
        self.prefill_seconds = [0.0]

    def __call__(self, candidate) -> float:
        return 1.0 + 0.1 * autotune.query_tokens(candidate)


def test_generate_auto_reads_the_replay(model_with_replay, monkeypatch):
    from tidar.cli import _auto_draft_choice

    monkeypatch.setattr(autotune, "EngineSteps", StepsByQueryTokens)
    backend = TorchBackend.load(model_with_replay, dtype="float32")
    choice = _auto_draft_choice(backend, None, str(model_with_replay))
    assert choice.shape == (2, 1)  # 1.9 / 1.4 beats AR's 1 / 1.1
    assert autotune.as_shape(choice.policy.best(1)) == (2, 1)  # what `tidar generate` adapts from
    (model_with_replay / autotune.ACCEPTANCE_FILE).write_text(json.dumps({"acceptance": [0.0] * 15}))
    assert _auto_draft_choice(backend, None, str(model_with_replay)).shape == (0, 0)  # no replay: the estimate


def test_server_policy_reads_the_replay(model_with_replay, monkeypatch):
    from tidar.serving.options import ServingOptions
    from tidar.serving.requests import build_scheduler
    from tidar.serving.supervisor import AUTOTUNE_CACHE_ENV

    monkeypatch.delenv(AUTOTUNE_CACHE_ENV, raising=False)  # measured now, not read from a cache
    monkeypatch.setattr(autotune, "EngineSteps", StepsByQueryTokens)
    options = ServingOptions(draft_len=None, autotune_batch_sizes=(1,), autotune_draft_lens=(0, 2),
                             autotune_repeats=1, attention="eager")
    lines = []
    scheduler = build_scheduler(model_with_replay, options, progress=lines.append)[0]
    try:
        assert scheduler.policy.replayed == {"b2k1": 1.9}
        assert autotune.as_shape(scheduler.policy.best(1)) == (2, 1)
    finally:
        scheduler.close()
    said = "\n".join(lines)
    assert f"expected tokens per step from {autotune.ACCEPTANCE_FILE}" in said and "replayed tokens per step" in said
    assert "batch 1 uses b2k1" in said


def test_bench_writes_replayed_tokens_per_step_equal_to_its_measured(tiny_checkpoints, tmp_path):
    """`tidar bench --write-acceptance` on a tiny model: the replayed tokens per step of every
    shape that ran equals the bench's own measured tokens per step, and the file loads."""
    from tidar.runtime.bench import bench

    folder = shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "model")
    report = bench(folder, tmp_path / "out", prompts=2, prompt_tokens=16, max_new_tokens=12, repeats=1,
                   draft_lens=(4,), peers=False, write_acceptance=True, progress=lambda _: None, draft_blocks=(1,))
    replayed = autotune.load_replayed(folder, 16)
    assert replayed is not None and len(replayed) == 16 * 17 // 2
    for name, method in report["methods"].items():
        if method["draft_len"] and method["drafter"] == "tidar":  # the hybrid's n-gram drafts are not replayed
            shape = autotune.shape_name((method["draft_len"], method["draft_blocks"]))
            assert replayed[shape] == method["tokens_per_step"], name
    candidate = report["autotune"]["candidates"]["b4k1"]
    assert candidate["replayed_tokens_per_step"] == candidate["measured_tokens_per_step"] == \
        candidate["expected_tokens_per_step"]
    assert candidate["markov_tokens_per_step"] == round(expected_tokens(report["autotune"]["acceptance"], 4, 1), 4)

"""Hybrid drafts (docs/design.md §3.9): proposals from TiDAR's block or an n-gram continuation of
the text, verification unchanged.

What is tested
- The n-gram proposer (runtime/ngram.py) against transformers' prompt lookup
  (`PromptLookupCandidateGenerator.get_candidates`) on every prefix of texts that repeat, with
  end ids, for several match lengths and proposal limits; the index is extended token by token.
- The per-source hazards: what a step's committed tokens say about a candidate, placed or not.
- Greedy output of the bundled model with the hybrid and ngram drafters equals transformers'
  greedy generation, on prompts that repeat (n-gram proposals fire) and prompts that do not, in
  one batch (rows place proposals of different sources in the same step), at k = b and k < b.
- Per-source counters add up to the totals, in every delta and in the result.
- Seeded sampling at T = 0.8 on the bundled model: the same seed gives the same text with the
  drafter tidar, hybrid or ngram (and AR), while n-gram proposals were placed.
- I2 with n-gram proposals: unseeded rows verify them by residual sampling with a point-mass q,
  seeded rows by coupling; continuations of a 6-token model follow the exact AR distribution
  (the enumeration and chi-square test of tests/test_sampling.py, ALPHA = 1e-3 each). Power:
  the same test rejects n-gram proposals verified with TiDAR's distributions as their q.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import threading
from collections import Counter

import pytest
import torch
import transformers
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from tidar import BUNDLED_MODEL
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.calibrate import heldout_prompts
from tidar.runtime.generate import DecodeEngine, Request, RequestError
from tidar.runtime.ngram import NgramIndex, NgramProposal, SourceEstimate, choose_source, score
from tidar.runtime.sampling import SamplingParams
from tidar.runtime.tokenizer import Tokenizer

from test_sampling import (ALPHA, CONTINUATION, ENGINE_SAMPLES, PROMPT, ar_distribution, assert_no_near_ties,
                           chi_square_pvalue, model)  # noqa: F401  (model: the 6-token model fixture)

NEW_TOKENS = 48


# ---------------------------------------------------------------------------- the proposer
def prompt_lookup(text: list[int], max_ngram: int, limit: int, eos_ids: list[int]) -> list[int]:
    """transformers' candidates for `text` (the oracle)."""
    generator = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(eos_ids), num_output_tokens=limit,
                                               max_matching_ngram_size=max_ngram, max_length=10 ** 6)
    ids = torch.tensor([text])
    candidates, _ = generator.get_candidates(ids)
    return candidates[0, len(text):].tolist()


def repeating_texts() -> list[list[int]]:
    rng = random.Random(7)
    texts = [[rng.randrange(3, 8) for _ in range(120)]]  # a small alphabet: matches of every length
    phrase = [rng.randrange(3, 40) for _ in range(9)]
    texts.append([t for _ in range(6) for t in phrase[:rng.randrange(3, 9)] + [rng.randrange(3, 40)]])
    texts.append([rng.choice([0, 3, 4, 5]) for _ in range(80)])  # 0: an end id
    return texts


@pytest.mark.parametrize("max_ngram,limit", [(1, 3), (2, 10), (3, 7), (4, 15)])
def test_ngram_proposals_equal_transformers_prompt_lookup(max_ngram, limit):
    proposed = 0
    for text in repeating_texts():
        index = NgramIndex(text[:1], max_ngram, eos_ids=[0])
        for end in range(1, len(text) + 1):
            if end > 1:
                index.extend(text[end - 1:end])
            assert index.tokens == text[:end]
            proposal = index.propose(limit)
            expected = prompt_lookup(text[:end], max_ngram, limit, [0])
            assert list(proposal.tokens) == expected, f"text[:{end}] = {text[:end]}"
            assert (proposal.match_len > 0) == bool(expected)
            proposed += bool(expected)
    assert proposed > 50  # the texts repeat: most prefixes have a continuation


def test_ngram_proposals_on_bundled_tokenizer_text():
    """The same on the tokens of held-out code (the bundled model's tokenizer), no end ids."""
    tokenizer = Tokenizer(BUNDLED_MODEL)
    text = [t for prompt in heldout_prompts(BUNDLED_MODEL, tokenizer, 2, 64) for t in prompt]
    index = NgramIndex((), 3)
    found = 0
    for end in range(1, len(text) + 1):
        index.extend(text[end - 1:end])
        expected = prompt_lookup(text[:end], 3, 10, [])
        assert list(index.propose(10).tokens) == expected
        found += bool(expected)
    assert found > len(text) // 4


def test_match_length_is_the_longest_matching_suffix():
    index = NgramIndex([5, 6, 7, 9, 6, 7, 8, 5, 6, 7], max_ngram=3)
    assert index.propose(2) == NgramProposal((9, 6), 3)
    index.extend([4])  # "7 4" never occurred, "4" neither
    assert index.propose(2) == NgramProposal()
    with pytest.raises(ValueError, match="max_ngram"):
        NgramIndex([], max_ngram=0)


# ---------------------------------------------------------------------------- the choice
def test_hazards_count_known_positions_only():
    estimate = SourceEstimate()
    assert score((4, 5, 6), (4, 5, 9, 1)) == (2, 3)  # 2 accepted, position 3 rejected
    estimate.observe(*score((4, 5, 6), (4, 5, 9, 1)))
    assert (estimate.at_risk, estimate.accepted) == ([1, 1, 1], [1, 1, 0])
    estimate.observe(*score((4, 5, 6), (4, 5)))  # committed 2 tokens, both matched: position 3 unknown
    assert (estimate.at_risk, estimate.accepted) == ([2, 2, 1], [2, 2, 0])
    assert estimate.hazard(0) == pytest.approx(2.5 / 3)  # prior: one observation at 0.5
    assert estimate.hazard(2) == pytest.approx(0.5 / 2)
    assert estimate.expected_accepted(2) == pytest.approx(2.5 / 3 + (2.5 / 3) ** 2)


def test_choice_follows_the_expected_accepted_proposals():
    good, poor = SourceEstimate(), SourceEstimate()
    for _ in range(20):
        good.observe(3, 3)
        poor.observe(0, 3)
    long_match, short_match = NgramProposal((1, 2, 3), 3), NgramProposal((1, 2, 3), 1)
    assert choose_source("hybrid", poor, good, 3, long_match) == "ngram"
    assert choose_source("hybrid", good, poor, 3, long_match) == "tidar"
    assert choose_source("hybrid", poor, good, 3, short_match) == "tidar"  # below min_match
    assert choose_source("ngram", good, poor, 3, long_match) == "ngram"
    assert choose_source("tidar", poor, good, 3, long_match) == "tidar"
    assert choose_source("hybrid", poor, good, 3, NgramProposal()) == "tidar"


# ---------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def bundled():
    backend = TorchBackend.load(BUNDLED_MODEL, dtype="float32")
    tokenizer = Tokenizer(BUNDLED_MODEL)
    repeating = heldout_prompts(BUNDLED_MODEL, tokenizer, 2, 64)
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
    distinct = list(range(300, 364))  # 64 distinct tokens: no n-gram of the prompt repeats
    return backend, tokenizer, repeating + [tokenizer.encode(code), distinct]


@pytest.fixture(scope="module")
def transformers_greedy(bundled):
    _, _, prompts = bundled
    hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id, config.pad_token_id = None, 1  # run to the length, as eos_ids=() does
    config.do_sample, config.max_new_tokens = False, NEW_TOKENS
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def assert_counters_add_up(stats) -> None:
    assert sum(stats.drafts_by_source.values()) == stats.drafts
    assert sum(stats.proposed_by_source.values()) == stats.draft_tokens
    assert sum(stats.accepted_by_source.values()) == stats.accepted_tokens
    for source, accepted in stats.accepted_by_source.items():
        assert 0 <= accepted <= stats.proposed_by_source[source]


@pytest.mark.parametrize("drafter,draft_len,draft_blocks", [("hybrid", 4, 4), ("hybrid", 8, 2), ("ngram", 4, 1),
                                                            ("tidar", 4, 4)])
def test_greedy_output_equals_transformers(bundled, transformers_greedy, drafter, draft_len, draft_blocks):
    backend, tokenizer, prompts = bundled
    engine = DecodeEngine(backend, tokenizer, draft_len=draft_len, draft_blocks=draft_blocks, drafter=drafter)
    requests = [Request(p, NEW_TOKENS, eos_ids=()) for p in prompts]
    totals = [None] * len(requests)
    results = []
    for deltas in engine.stream(requests):
        for delta in deltas:
            assert_counters_add_up(delta.step_stats)
            index = delta.admission
            if totals[index] is None:
                totals[index] = delta.step_stats.copy()
            else:
                totals[index].add(delta.step_stats)
            if delta.result is not None:
                results.append(delta.result)
    results.sort(key=lambda r: prompts.index(r.prompt_ids))
    for result, expected, total in zip(results, transformers_greedy, totals):
        assert result.token_ids == expected
        assert_counters_add_up(result.stats)
        assert (result.stats.drafts_by_source, result.stats.proposed_by_source, result.stats.accepted_by_source) == \
            (total.drafts_by_source, total.proposed_by_source, total.accepted_by_source)
    ngram_proposed = [r.stats.proposed_by_source.get("ngram", 0) for r in results]
    if drafter == "tidar":
        assert not any(ngram_proposed)
    else:
        assert ngram_proposed[-2] > 0  # the repeating code prompt placed n-gram proposals
        assert sum(r.stats.proposed_by_source.get("tidar", 0) for r in results) > 0  # and TiDAR's


def test_seeded_sampling_is_the_same_text_with_the_hybrid_on_and_off(bundled):
    backend, tokenizer, prompts = bundled
    sampling = [SamplingParams(temperature=0.8, seed=1234 + i) for i in range(len(prompts))]
    requests = [Request(p, NEW_TOKENS, sampling=s, eos_ids=()) for p, s in zip(prompts, sampling)]
    reference = [r.token_ids for r in DecodeEngine(backend, tokenizer, draft_len=0).generate(requests)]
    ngram_proposed = 0
    for drafter, draft_len, draft_blocks in [("tidar", 4, 4), ("hybrid", 4, 4), ("hybrid", 8, 2), ("ngram", 4, 4)]:
        engine = DecodeEngine(backend, tokenizer, draft_len=draft_len, draft_blocks=draft_blocks, drafter=drafter)
        results = engine.generate(requests)
        assert [r.token_ids for r in results] == reference, (drafter, draft_len, draft_blocks)
        for result in results:
            assert_counters_add_up(result.stats)
            ngram_proposed += result.stats.proposed_by_source.get("ngram", 0)
    assert ngram_proposed > 0


def test_bad_drafter_settings_are_refused(bundled):
    backend, _, _ = bundled
    with pytest.raises(RequestError, match="drafter must be one of tidar, hybrid, ngram, got 'lookup'"):
        DecodeEngine(backend, draft_len=4, drafter="lookup")
    with pytest.raises(RequestError, match="min_match must be a positive integer, got 0"):
        DecodeEngine(backend, draft_len=4, drafter="hybrid", min_match=0)


def test_draft_length_changes_keep_the_hybrid_lossless(bundled, transformers_greedy):
    """set_draft_len between steps (through b = 1, where nothing is proposed, and back): the
    n-gram index catches up with the text, pending proposals are cut or padded."""
    backend, tokenizer, prompts = bundled
    engine = DecodeEngine(backend, tokenizer, draft_len=8, drafter="hybrid")
    results = [d.result for d in engine.add([Request(p, NEW_TOKENS, eos_ids=()) for p in prompts]) if d.finished]
    lengths = iter([4, 1, 8, 2, 16, 4] * 20)
    while engine.rows:
        engine.set_draft_len(next(lengths))
        results += [d.result for d in engine.step() if d.finished]
    results.sort(key=lambda r: prompts.index(r.prompt_ids))
    assert [r.token_ids for r in results] == transformers_greedy
    assert sum(r.stats.proposed_by_source.get("ngram", 0) for r in results) > 0


# ---------------------------------------------------------------------------- I2 with n-gram proposals
@pytest.mark.parametrize("mechanism", ["residual", "coupled"])
def test_i2_holds_with_ngram_proposals(model, mechanism):  # noqa: F811  (the fixture imported above)
    """Continuations of the 6-token model sampled with n-gram proposals placed whenever a 1-token
    match exists (drafter "ngram", min_match 1) follow the exact AR distribution; both the
    n-gram proposals' accept path and their rejections ran."""
    params = SamplingParams(temperature=1.0)
    exact, logits = ar_distribution(model, PROMPT, CONTINUATION, params)
    assert_no_near_ties(logits, params)
    engine = DecodeEngine(TorchBackend(model), draft_len=4, drafter="ngram", min_match=1)
    seed_base = 70_000 if mechanism == "residual" else 80_000
    torch.manual_seed(seed_base)
    requests = [Request(PROMPT, CONTINUATION, eos_ids=(),
                        sampling=dataclasses.replace(params, seed=seed_base + i if mechanism == "coupled" else None))
                for i in range(ENGINE_SAMPLES)]
    results = engine.generate(requests)
    assert all(len(r.token_ids) == CONTINUATION for r in results)
    proposed = sum(r.stats.proposed_by_source.get("ngram", 0) for r in results)
    accepted = sum(r.stats.accepted_by_source.get("ngram", 0) for r in results)
    assert 0 < accepted < proposed, "n-gram proposals must be both accepted and rejected"
    pvalue = chi_square_pvalue(Counter(tuple(r.token_ids) for r in results), exact)
    print(f"\nI2 n-gram proposals {mechanism}: n-gram acceptance {accepted / proposed:.3f}, p = {pvalue:.3g}")
    assert pvalue > ALPHA, f"samples with n-gram proposals do not follow the AR distribution (p = {pvalue:.3g})"


def test_i2_test_rejects_n_gram_proposals_verified_with_the_wrong_q(model, monkeypatch):  # noqa: F811
    """Power check: residual rows whose n-gram proposals keep TiDAR's distributions as q (instead
    of a point mass) are caught by the same test and sample size."""
    from tidar.runtime.batch_state import BatchState

    place = BatchState.place_proposals

    def keep_tidar_q(self, indices, proposals, pad_id):
        probs = None if self.draft_probs is None else self.draft_probs.clone()
        place(self, indices, proposals, pad_id)
        self.draft_probs = probs

    monkeypatch.setattr(BatchState, "place_proposals", keep_tidar_q)
    params = SamplingParams(temperature=1.0)
    exact, _ = ar_distribution(model, PROMPT, CONTINUATION, params)
    engine = DecodeEngine(TorchBackend(model), draft_len=4, drafter="ngram", min_match=1)
    torch.manual_seed(70_000)
    results = engine.generate([Request(PROMPT, CONTINUATION, eos_ids=(), sampling=params)
                               for _ in range(ENGINE_SAMPLES)])
    pvalue = chi_square_pvalue(Counter(tuple(r.token_ids) for r in results), exact, impossible_ok=True)
    print(f"\nI2 power, n-gram proposals with TiDAR's q: p = {pvalue:.3g}")
    assert pvalue < ALPHA, f"the I2 test did not detect a wrong q for n-gram proposals (p = {pvalue:.3g})"


# ---------------------------------------------------------------------------- serving
def test_serving_option_reaches_the_scheduler_engines(bundled, transformers_greedy):
    """ServingOptions.drafter (a config.pbtxt parameter) -> SchedulerConfig.drafter -> every
    engine of the scheduler; served greedy output still equals transformers'."""
    from tidar.serving.options import OptionsError, ServingOptions
    from tidar.serving.scheduler import ADAPTIVE, Scheduler, SchedulerConfig

    options = ServingOptions.from_parameters({"drafter": "tidar"})
    assert options.drafter == "tidar" and options.to_parameters()["drafter"] == "tidar"
    assert ServingOptions().drafter == SchedulerConfig().drafter == "hybrid"  # the default (ngram.DEFAULT_DRAFTER)
    options = ServingOptions.from_parameters({"drafter": "hybrid"})
    with pytest.raises(OptionsError, match="drafter must be one of tidar, hybrid, ngram, got 'lookup'"):
        ServingOptions.from_parameters({"drafter": "lookup"})
    backend, tokenizer, prompts = bundled
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(draft_len=4, drafter=options.drafter), policy=None)
    try:
        assert scheduler.engines[ADAPTIVE].drafter == "hybrid"
        results, done = {}, threading.Event()

        def submit(index, prompt, draft_len=None):
            def on_delta(delta):
                if delta.result is not None:
                    results[index] = delta.result
                    if len(results) == len(prompts) + 1:
                        done.set()

            scheduler.submit(Request(prompt, NEW_TOKENS, eos_ids=()), on_delta, lambda kind, message: done.set(),
                             draft_len=draft_len)

        for index, prompt in enumerate(prompts):
            submit(index, prompt)
        submit(len(prompts), prompts[-2], draft_len=8)  # a request's own draft length: an engine of its own
        assert done.wait(600), "the served requests did not finish"
        assert [results[i].token_ids for i in range(len(prompts))] == transformers_greedy
        assert results[len(prompts)].token_ids == transformers_greedy[-2]
        assert all(engine.drafter == "hybrid" for engine in scheduler.engines.values())
        assert len(scheduler.engines) == 2
        assert sum(r.stats.proposed_by_source.get("ngram", 0) for r in results.values()) > 0
    finally:
        scheduler.close()


# ---------------------------------------------------------------------------- the drafter's choice
def test_choose_drafter_takes_the_fastest_and_ties_go_to_tidar():
    from tidar.runtime.autotune import TIE_TOLERANCE, choose_drafter

    assert choose_drafter({"tidar": 100.0, "hybrid": 120.0}) == "hybrid"
    assert choose_drafter({"tidar": 120.0, "hybrid": 100.0}) == "tidar"
    assert choose_drafter({"tidar": 100.0, "hybrid": 100.0 / (1 - TIE_TOLERANCE / 2)}) == "tidar"
    with pytest.raises(ValueError, match="at least one drafter"):
        choose_drafter({})


def test_bench_runs_the_hybrid_at_the_chosen_shape(tiny_checkpoints, tmp_path):
    """`tidar bench`'s tidar-hybrid method: the autotuned shape, output equal to AR, per-source
    counters, and the drafter choice in the report and its table."""
    from tidar.runtime.bench import bench, table

    report = bench(tiny_checkpoints["qwen2"], tmp_path, prompts=2, prompt_tokens=16, max_new_tokens=24, repeats=1,
                   draft_lens=(4,), peers=False, progress=lambda _: None, draft_blocks=(1,), autotune_budget_s=5)
    hybrid, auto = report["methods"]["tidar-hybrid"], report["methods"]["tidar-auto"]
    assert (hybrid["draft_len"], hybrid["draft_blocks"]) == (auto["draft_len"], auto["draft_blocks"])
    assert hybrid["drafter"] == "hybrid" and auto["drafter"] == "tidar"
    assert hybrid["equals_ar"] and auto["equals_ar"]
    drafter = report["autotune"]["drafter"]
    assert set(drafter["tokens_per_second"]) == {"tidar", "hybrid"}
    assert drafter["chosen"] in ("tidar", "hybrid")
    assert "Drafter at the chosen shape" in table(report)
    default = report["default"]  # what `tidar generate` does unasked: the autotuned shape, hybrid drafts
    assert (default["method"], default["drafter"], report["backend"]) == ("tidar-hybrid", "hybrid", "torch")
    assert default["default_over_ar"] == round(hybrid["tokens_per_second"] / report["methods"]["ar"]["tokens_per_second"], 3)
    assert "Default (tidar-hybrid" in table(report)
    if auto["draft_len"] > 1:
        assert sum(hybrid["proposed_by_source"].values()) > 0

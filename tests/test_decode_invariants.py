"""Invariants of the draft-verify loop (docs/design.md §3 and §4), each against an independent oracle.

- I1 lossless: greedy TiDAR output equals `transformers` greedy `generate` of the same weights,
  for every family, draft length 1..16 and 20 prompts, solo and batched; draft length 0 (AR
  through the same loop) too; and with k < b mask blocks (docs/design.md §3.4), solo, batched
  and with the shape (b, k) changed between steps.
- I3 cache: after every step the committed KV equals the KV of a `transformers` prefill of the
  committed sequence.
- I4 batching: ragged batches (lengths, settings, stop conditions, rows leaving and joining)
  give row by row what each request gives alone.
- Stop conditions (eos, max_new_tokens, stop strings), streaming deltas and statistics.
- Draft length validation.

Random weights reject almost every draft, which would leave the accept path untested. So most
tests run the real model behind `OracleBackend`, a backend wrapper that, after the real
forward, overwrites the logits of the mask rows (never the AR rows that verification reads):
a mask at position p predicts token p of the oracle sequence (prompt + HF greedy continuation),
for every mask ("forced": every draft is accepted) or for a pseudo-random half of the
positions ("mixed": acceptance counts vary between 1 and b). Since the mask predictions only
make proposals, the output must still equal the oracle; and since the hook is a known function
of position, the number of tokens every step commits can be predicted exactly
(`expected_schedule`), which checks the accept / advance / next-proposal bookkeeping.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
from dataclasses import dataclass

import pytest
import torch

from fakes.logits_backend import LogitsBackend
from tidar.runtime.generate import DecodeEngine, Delta, Request, RequestError, Result
from tidar.runtime.layout import next_proposals
from tidar.runtime.sampling import SamplingParams
from tidar.runtime.tokenizer import Tokenizer

FAMILIES = ("qwen2", "qwen3", "llama")
DRAFT_LENS = (1, 2, 4, 8, 16)
EOS_ID, PAD_ID = 0, 1  # tiny checkpoints: <|endoftext|> = 0, <|pad|> = 1, [MASK] = 2
FIRST_PLAIN_ID = 3  # random prompts avoid the special tokens

ORACLE_TOKENS = 64  # HF continuation length: covers every request below plus one step of drafts
NEW_TOKENS = {"none": 20, "mixed": 32, "forced": 48}  # requests' max_new_tokens per hook mode
RANDOM_PROMPT_LENGTHS = (1, 2, 3, 4, 6, 8, 11, 14, 17, 20, 23, 27, 31, 35, 38, 40)
REAL_PROMPTS = (
    "def main():\n    return 0\n",
    "import os\nimport sys\n",
    "class Parser(object):\n    \"\"\"Parse a file.\"\"\"\n",
    "for key, value in items.items():\n    print(key, value)",
)

# "mixed" hook: the masks predict the oracle token at the positions where this is True.
_pattern = random.Random(1234)
MIXED_CORRECT = tuple(_pattern.random() < 0.5 for _ in range(4096))
FORCED_LOGIT = 8.0
"""Height of a hooked mask's logit over the others (0): the argmax for greedy rows, but with a
vocabulary of 512 at temperature 1 only about 85% of a sampled proposal's mass (less above 1),
so sampled rows still draw random proposals from their own generators."""


# ---------------------------------------------------------------------------- oracle
@dataclass
class Case:
    """A prompt and the HF greedy continuation of it (ORACLE_TOKENS long, or ended by eos)."""

    prompt: list[int]
    continuation: list[int]

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.continuation

    def expected(self, max_new_tokens: int) -> list[int]:
        """HF greedy output for `max_new_tokens` (greedy output is prefix-consistent)."""
        assert max_new_tokens <= ORACLE_TOKENS
        return self.continuation[:max_new_tokens]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int = EOS_ID) -> list[int]:
    """transformers' greedy continuation of `prompt`; ends with `eos_id` if it stopped on it."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=PAD_ID)
    return out[0, len(prompt):].tolist()


def make_prompts(family_index: int, vocab_size: int, tokenizer: Tokenizer) -> list[list[int]]:
    generator = torch.Generator().manual_seed(100 + family_index)
    prompts = [torch.randint(FIRST_PLAIN_ID, vocab_size, (n,), generator=generator).tolist()
               for n in RANDOM_PROMPT_LENGTHS]
    prompts += [tokenizer.encode(text) for text in REAL_PROMPTS]
    return prompts


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoints) -> dict[str, Tokenizer]:
    return {family: Tokenizer(path) for family, path in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def oracles(tiny_backends, hf_models, tokenizers) -> dict[str, list[Case]]:
    """{family: [Case]}: 20 prompts per family and their HF greedy continuations, computed once."""
    cases = {}
    for index, family in enumerate(FAMILIES):
        prompts = make_prompts(index, tiny_backends[family].config.vocab_size, tokenizers[family])
        assert len({tuple(p) for p in prompts}) == len(prompts) and all(1 <= len(p) <= 40 for p in prompts)
        cases[family] = [Case(p, hf_greedy(hf_models[family], p, ORACLE_TOKENS)) for p in prompts]
    return cases


# ---------------------------------------------------------------------------- the hook
class OracleBackend(LogitsBackend):
    """The backend protocol around a real backend. After the real forward, the logits of every
    mask row (new tokens from `layout.causal_len` on) are replaced by a large logit at the
    token the mask should predict: oracle token p for the mask at position p ("forced"), or
    that at the positions where MIXED_CORRECT holds and a wrong token elsewhere ("mixed");
    "none" leaves the logits alone. AR rows are never touched, so verification stays real.

    A row's oracle is found by its prompt: in a prefill (every cached length is 0) the prompt
    is the causal run of the input; in a step the rows are `engine.rows`, in order. The wrapper
    also records which prompts took part in each forward."""

    def __init__(self, backend, cases: list[Case], mode: str):
        assert mode in ("none", "forced", "mixed")
        self.backend, self.config, self.mode = backend, backend.config, mode
        self.sequences = {tuple(case.prompt): case.sequence for case in cases}
        self.engine: DecodeEngine | None = None
        self.participants: list[list[tuple[int, ...]]] = []

    def new_cache(self, batch: int, capacity: int):
        return self.backend.new_cache(batch, capacity)

    def correct(self, prompt: tuple[int, ...], position: int) -> bool:
        """Whether the mask at `position` of this row predicts the oracle token."""
        known = position < len(self.sequences[prompt])
        return known and self.mode != "none" and (self.mode == "forced" or MIXED_CORRECT[position])

    def mask_token(self, prompt: tuple[int, ...], position: int) -> int:
        span = self.config.vocab_size - FIRST_PLAIN_ID
        sequence = self.sequences[prompt]
        truth = sequence[position] if position < len(sequence) else FIRST_PLAIN_ID + position % span
        if self.correct(prompt, position):
            return truth
        shift = 1 + (position * 7919) % (span - 1)  # never 0 mod span: a token other than the truth
        return FIRST_PLAIN_ID + (truth - FIRST_PLAIN_ID + shift) % span

    def logits(self, input_ids: torch.Tensor, layout, cache) -> torch.Tensor:
        positions = layout.position_ids(cache.lengths.clone())  # before the forward writes
        causal = layout.causal_len
        if bool((cache.lengths == 0).all()):
            prompts = [tuple(row[:causal]) for row in input_ids.tolist()]
        else:
            prompts = [tuple(row.prompt_ids) for row in self.engine.rows]
        assert len(prompts) == input_ids.shape[0]
        self.participants.append(prompts)
        logits = self.backend.forward(input_ids, layout, cache)
        if self.mode == "none" or layout.num_new == causal:
            return logits
        logits = logits.clone()
        for r, prompt in enumerate(prompts):
            targets = torch.tensor([self.mask_token(prompt, int(p)) for p in positions[r, causal:]])
            rows = torch.zeros(len(targets), logits.shape[-1], dtype=logits.dtype)
            rows[torch.arange(len(targets)), targets] = FORCED_LOGIT
            logits[r, causal:] = rows
        return logits


def make_engine(backend, cases: list[Case], mode: str, draft_len: int, tokenizer=None,
                draft_blocks: int | None = None) -> DecodeEngine:
    hooked = OracleBackend(backend, cases, mode)
    engine = DecodeEngine(hooked, tokenizer, draft_len=draft_len, draft_blocks=draft_blocks)
    hooked.engine = engine
    return engine


def expected_schedule(hook: OracleBackend, prompt: list[int], out_len: int, draft_len: int,
                      draft_blocks: int | None = None):
    """(tokens each forward emits, prefill first; proposals each step accepts; proposals each
    step verifies) when the greedy output equals the oracle: a step at cached length L with n
    proposals accepts the leading run of correct ones at positions L+1..L+n and emits run + 1
    tokens; the last forward's emission is trimmed to `out_len` (its counts are not). n is b - 1
    after the prefill and after a run < k; after a run >= k, only the masks of block k past the
    new d_0 propose (docs/design.md §3.4): b - 1 - (run - k + 1) of them."""
    k = draft_len if draft_blocks is None else draft_blocks
    key, sizes, runs, position = tuple(prompt), [1], [], len(prompt)  # d_0 sits at the prompt's end
    proposed, proposals = [], max(draft_len - 1, 0)
    while sum(sizes) < out_len:
        run = 0
        while run < proposals and hook.correct(key, position + 1 + run):
            run += 1
        sizes.append(run + 1)
        runs.append(run)
        proposed.append(proposals)
        position += run + 1
        proposals = draft_len - 1 - (run - k + 1 if run >= k else 0)
    sizes[-1] -= sum(sizes) - out_len
    return sizes, runs, proposed


# ---------------------------------------------------------------------------- drivers / checks
def run_streamed(engine: DecodeEngine, requests: list[Request]) -> tuple[list[Result], list[list[Delta]]]:
    """Run `requests` as one batch through `engine.stream`; results and deltas in request order."""
    requests = [dataclasses.replace(r, request_id=i) for i, r in enumerate(requests)]
    deltas: list[list[Delta]] = [[] for _ in requests]
    for batch in engine.stream(requests):
        for delta in batch:
            deltas[delta.request_id].append(delta)
    results = [row[-1].result for row in deltas]
    assert [r.request_id for r in results] == list(range(len(requests)))
    return results, deltas


def assert_stream_consistent(result: Result, deltas: list[Delta]) -> None:
    """Deltas concatenate to the result; exactly one (the last) says finished; one per forward."""
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert "".join(d.text for d in deltas) == result.text
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].finish_reason == result.finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert result.stats.forward_passes == len(deltas)
    assert deltas[-1].result is result and all(d.result is None for d in deltas[:-1])
    assert_totals_are_sums(result, deltas)


def assert_totals_are_sums(result: Result, deltas: list[Delta]) -> None:
    """The result's counters are the sums of the deltas' increments (summed here, column by
    column, not with `Stats.add`); proposal positions past the ones any step used count 0."""
    steps = [d.step_stats for d in deltas]
    for name in ("forward_passes", "drafts", "draft_tokens", "accepted_tokens", "prefill_seconds"):
        assert getattr(result.stats, name) == sum(getattr(s, name) for s in steps), name
    for name in ("accepted_per_position", "proposed_per_position"):
        columns = [sum(c) for c in itertools.zip_longest(*(getattr(s, name) for s in steps), fillvalue=0)]
        padded = columns + [0] * (len(getattr(result.stats, name)) - len(columns))
        assert getattr(result.stats, name) == padded, name
    assert steps[0].prefill_seconds > 0 and all(s.prefill_seconds == 0 for s in steps[1:])


def assert_stats_consistent(result: Result, draft_len: int, draft_blocks: int | None = None) -> None:
    stats, b = result.stats, draft_len
    steps = stats.forward_passes - 1
    assert stats.forward_passes >= 1
    assert stats.accepted_tokens == sum(stats.accepted_per_position)
    assert len(stats.accepted_per_position) == len(stats.proposed_per_position) == max(b - 1, 0)
    # accepting proposal i+1 needs proposal i accepted: counts never grow along the block
    assert all(x >= y for x, y in zip(stats.accepted_per_position, stats.accepted_per_position[1:]))
    assert all(x >= y for x, y in zip(stats.proposed_per_position, stats.proposed_per_position[1:]))
    assert all(a <= p for a, p in zip(stats.accepted_per_position, stats.proposed_per_position))
    assert stats.draft_tokens == sum(stats.proposed_per_position)
    if b > 1 and draft_blocks in (None, b):
        assert stats.drafts == steps and stats.draft_tokens == steps * (b - 1)
        assert stats.proposed_per_position == [steps] * (b - 1)
        assert all(0 <= x <= steps for x in stats.accepted_per_position)
    elif b > 1:  # k < b: a step after a run >= k verifies fewer proposals (k = 1: maybe none)
        assert stats.drafts <= steps and stats.draft_tokens <= steps * (b - 1)
        assert stats.proposed_per_position[:draft_blocks - 1] == [stats.drafts] * (draft_blocks - 1)
    else:
        assert stats.drafts == stats.draft_tokens == stats.accepted_tokens == 0
    # prefill emits d_0; a step emits accepted + 1 tokens; trimming only removes
    assert len(result.token_ids) <= 1 + steps + stats.accepted_tokens
    assert len(result.token_ids) <= stats.forward_passes * max(b, 1)
    assert 1 <= len(result.token_ids) <= result.request.max_new_tokens


def comparable(result: Result) -> tuple:
    """Everything of a result that must not depend on the batch (not timings)."""
    s = result.stats
    return (result.token_ids, result.text, result.finish_reason, s.forward_passes, s.drafts,
            s.draft_tokens, s.accepted_tokens, s.accepted_per_position)


def finish_reason_for(tokens: list[int], eos_ids=(EOS_ID,)) -> str:
    return "stop" if tokens and tokens[-1] in eos_ids else "length"


# ---------------------------------------------------------------------------- I1 lossless
I1_CASES = [(b, mode) for b in DRAFT_LENS for mode in ("none", "forced", "mixed") if b > 1 or mode == "none"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("draft_len,mode", I1_CASES)
def test_i1_greedy_equals_transformers(family, draft_len, mode, tiny_backends, oracles):
    """Each prompt alone: tokens == HF greedy (eos included); with a hook, every forward emits
    exactly the predicted number of tokens, so T/NFE is what the acceptance pattern allows."""
    cases, max_new = oracles[family], NEW_TOKENS[mode]
    step_sizes = set()
    for index, case in enumerate(cases):
        engine = make_engine(tiny_backends[family], cases, mode, draft_len)
        (result,), (deltas,) = run_streamed(engine, [Request(case.prompt, max_new)])
        expected = case.expected(max_new)
        assert result.token_ids == expected, f"prompt {index} ({len(case.prompt)} tokens)"
        assert result.finish_reason == finish_reason_for(expected)
        assert_stream_consistent(result, deltas)
        assert_stats_consistent(result, draft_len)
        if mode == "none":
            continue
        sizes, runs, _ = expected_schedule(engine.backend, case.prompt, len(expected), draft_len)
        assert [len(d.token_ids) for d in deltas] == sizes, f"prompt {index}"
        assert result.stats.accepted_per_position == [sum(run > i for run in runs) for i in range(draft_len - 1)]
        step_sizes.update(sizes[1:-1])
        if mode == "forced":
            assert result.stats.forward_passes == 1 + math.ceil((len(expected) - 1) / draft_len)
            if len(expected) == max_new:
                assert result.tokens_per_forward >= 0.7 * draft_len
    if mode == "mixed":  # the hook really varies acceptance between 1 and b
        assert 1 in step_sizes and len(step_sizes) >= min(draft_len, 4), sorted(step_sizes)
    if mode == "forced":
        assert step_sizes == {draft_len}


@pytest.mark.parametrize("family", FAMILIES)
def test_i1_draft_len_0_is_ar_and_equals_transformers(family, tiny_backends, oracles):
    max_new = NEW_TOKENS["none"]
    for index, case in enumerate(oracles[family]):
        engine = DecodeEngine(tiny_backends[family], draft_len=0)
        (result,), (deltas,) = run_streamed(engine, [Request(case.prompt, max_new)])
        assert result.token_ids == case.expected(max_new), f"prompt {index}"
        assert result.stats.forward_passes == len(result.token_ids)  # one token per forward
        assert_stream_consistent(result, deltas)
        assert_stats_consistent(result, 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("draft_len,mode", [(8, "none"), (4, "mixed"), (16, "forced")])
def test_i1_batched_prompts_equal_transformers(family, draft_len, mode, tiny_backends, oracles):
    """All 20 prompts (lengths 1..40) in one generate() call; then a second call on the same
    engine (a few prompts, reversed) finds nothing left over from the first."""
    cases, max_new = oracles[family], NEW_TOKENS[mode]
    engine = make_engine(tiny_backends[family], cases, mode, draft_len)
    for batch in (cases, cases[::-4]):
        results = engine.generate([Request(case.prompt, max_new) for case in batch])
        assert [r.token_ids for r in results] == [case.expected(max_new) for case in batch]
        for result, case in zip(results, batch):
            assert result.prompt_ids == case.prompt
            assert_stats_consistent(result, draft_len)
        assert not engine.rows and engine.cache.batch == 0


# ---------------------------------------------------------------------------- I1 with k of b blocks
K_OF_B = [(2, 1), (4, 1), (4, 2), (8, 3), (16, 2)]


@pytest.mark.parametrize("mode", ["forced", "mixed"])
@pytest.mark.parametrize("draft_len,draft_blocks", K_OF_B, ids=[f"b{b}k{k}" for b, k in K_OF_B])
def test_i1_k_of_b_equals_transformers(draft_len, draft_blocks, mode, tiny_backends, oracles):
    """k < b blocks (docs/design.md §3.4), each of a few prompts alone: tokens == HF greedy, and
    every forward emits the predicted count, including the steps after a run >= k whose
    proposals are block k's later masks (forced: every proposal right, so runs alternate
    between b - 1 and k - 1); the statistics count exactly the proposals made."""
    family = "qwen2"
    cases, max_new = oracles[family], NEW_TOKENS[mode]
    for index, case in enumerate(cases[::5]):
        engine = make_engine(tiny_backends[family], cases, mode, draft_len, draft_blocks=draft_blocks)
        (result,), (deltas,) = run_streamed(engine, [Request(case.prompt, max_new)])
        expected = case.expected(max_new)
        assert result.token_ids == expected, f"prompt {index}"
        assert_stream_consistent(result, deltas)
        assert_stats_consistent(result, draft_len, draft_blocks)
        sizes, runs, proposed = expected_schedule(engine.backend, case.prompt, len(expected), draft_len,
                                                  draft_blocks)
        assert [len(d.token_ids) for d in deltas] == sizes, f"prompt {index}"
        assert result.stats.accepted_per_position == [sum(run > i for run in runs) for i in range(draft_len - 1)]
        assert result.stats.proposed_per_position == [sum(n > i for n in proposed) for i in range(draft_len - 1)]
        assert result.stats.draft_tokens == sum(proposed) and result.stats.drafts == sum(n > 0 for n in proposed)
        if mode == "forced" and len(sizes) > 3:
            assert sizes[1:3] == [draft_len, draft_blocks]  # a full run, then block k's later masks only


def test_next_proposals_rule():
    """The rule in words (docs/design.md §3.4), on ints and on a tensor alike: after a accepted
    (0-based block j sees d_0..d_j) the proposals are block a's masks 1..b-1 while a < k, else
    the masks of block k-1 whose positions come after the new d_0."""
    b, k = 6, 3
    for accepted in range(b):
        block, first, count = next_proposals(accepted, b, k)
        mask_positions = [block + 1 + m for m in range(b)]  # offsets from L: block j sees j+1 drafts
        wanted = [p for p in mask_positions if p > accepted + 1]  # past the new d_0 at L + accepted + 1
        assert block == min(accepted, k - 1)
        assert mask_positions[first:first + count] == wanted
    tensors = next_proposals(torch.arange(b), b, k)
    assert [t.tolist() for t in tensors] == [[next_proposals(a, b, k)[i] for a in range(b)] for i in range(3)]


@pytest.mark.parametrize("family", ["llama"])
def test_i1_k_of_b_batched_and_reshaped_between_steps(family, tiny_backends, oracles, hf_models):
    """Rows whose proposal counts differ share steps; the shape (b, k) changes before every step
    (set_draft_len), AR included; every row still equals HF greedy, and the committed KV equals
    HF prefill after every step (I3)."""
    cases = oracles[family]
    by_prompt = {tuple(case.prompt): case for case in cases}
    engine = make_engine(tiny_backends[family], cases, "mixed", 8, draft_blocks=2)
    batch = cases[1::4]
    results = {}

    def collect(deltas):
        results.update({tuple(d.result.prompt_ids): d.result.token_ids for d in deltas if d.result is not None})

    collect(engine.add([Request(case.prompt, 32) for case in batch]))
    shapes = iter([(8, 2), (8, 1), (4, 4), (16, 3), (0, None), (2, 1), (8, 8), (16, 1)] * 8)
    while engine.rows:
        engine.set_draft_len(*next(shapes))
        collect(engine.step())
        if engine.rows:
            assert_cache_equals_hf_prefill(engine, hf_models[family], by_prompt)
    assert [results[tuple(case.prompt)] for case in batch] == [case.expected(32) for case in batch]


@pytest.mark.parametrize("draft_len,draft_blocks", [(4, 0), (4, 5), (0, 1), (4, 1.5)])
def test_bad_draft_blocks_is_rejected(draft_len, draft_blocks, tiny_backends):
    with pytest.raises(RequestError, match="draft_blocks"):
        DecodeEngine(tiny_backends["qwen2"], draft_len=draft_len, draft_blocks=draft_blocks)
    engine = DecodeEngine(tiny_backends["qwen2"], draft_len=4)
    with pytest.raises(RequestError, match="draft_blocks"):
        engine.set_draft_len(draft_len, draft_blocks)


# ---------------------------------------------------------------------------- I3 cache
def hf_kv(past, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [batch, kv_heads, seq, head_dim] of one layer of a transformers cache."""
    if hasattr(past, "layers"):  # transformers >= 4.56 / 5.x
        return past.layers[layer].keys, past.layers[layer].values
    return past[layer][0], past[layer][1]


def assert_cache_equals_hf_prefill(engine: DecodeEngine, hf_model, cases_by_prompt: dict) -> None:
    """For every active row: cached length == prompt + emitted - 1 (d_0 has no KV yet), the
    emitted tokens follow the oracle, and the committed KV equals HF's prefill KV."""
    cache = engine.cache
    assert cache.batch == len(engine.rows)
    for r, row in enumerate(engine.rows):
        committed = row.prompt_ids + row.tokens[:-1]
        length = int(cache.lengths[r])
        assert length == len(row.prompt_ids) + len(row.tokens) - 1 == len(committed)
        assert int(engine.batch.drafts[r, 0]) == row.tokens[-1]
        assert row.tokens == cases_by_prompt[tuple(row.prompt_ids)].continuation[:len(row.tokens)]
        with torch.no_grad():
            past = hf_model(torch.tensor([committed]), use_cache=True).past_key_values
        for layer in range(engine.config.num_hidden_layers):
            keys, values = hf_kv(past, layer)
            torch.testing.assert_close(cache.keys[layer, r, :, :length], keys[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.values[layer, r, :, :length], values[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,draft_len,mode", [
    ("qwen2", 4, "mixed"), ("qwen3", 16, "mixed"), ("llama", 8, "mixed"), ("llama", 2, "mixed"),
    ("qwen2", 16, "forced"), ("qwen3", 0, "none"),
])
def test_i3_cache_equals_ar_prefill_after_every_step(family, draft_len, mode, tiny_backends, hf_models, oracles):
    """Driven by hand: two rows, a third joins after two steps with a larger capacity (the
    cache grows if it must), rows leave as they finish (the last row fills the hole); checked
    after every add and step."""
    cases = oracles[family]
    by_prompt = {tuple(case.prompt): case for case in cases}
    engine = make_engine(tiny_backends[family], cases, mode, draft_len)
    first = [Request(cases[3].prompt, 24), Request(cases[13].prompt, 40)]
    late = Request(cases[15].prompt, ORACLE_TOKENS - draft_len)  # 40 prompt tokens: needs more slots
    finished = sum(d.finished for d in engine.add(first))
    assert_cache_equals_hf_prefill(engine, hf_models[family], by_prompt)
    commit_sizes, steps = set(), 0
    while engine.rows:
        deltas = engine.step()
        finished += sum(d.finished for d in deltas)
        commit_sizes.update(len(d.token_ids) for d in deltas if not d.finished)
        steps += 1
        if steps == 2:
            capacity = engine.cache.capacity
            finished += sum(d.finished for d in engine.add([late]))
            assert engine.cache.capacity >= capacity and engine.rows[-1].prompt_ids == late.prompt_ids
        if engine.rows:
            assert_cache_equals_hf_prefill(engine, hf_models[family], by_prompt)
    assert finished == 3
    if mode == "mixed":
        assert len(commit_sizes) >= 2  # steps that kept different numbers of drafts were checked


# ---------------------------------------------------------------------------- I4 batching
def ragged_requests(cases: list[Case], tokenizer: Tokenizer) -> list[Request]:
    """Different prompt lengths, budgets, greedy and sampled rows, eos and stop strings."""
    eos_case, stop_case = cases[9], cases[18]
    _, eos_token = first_fresh_token(eos_case.continuation, start=5)
    picked = pick_stop_string(tokenizer, stop_case.continuation, after=4)
    assert picked is not None
    return [
        Request(cases[0].prompt, 30),
        Request(cases[15].prompt, 13, sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=1)),
        Request(eos_case.prompt, 40, eos_ids=(eos_token,)),
        Request(cases[6].prompt, 27, sampling=SamplingParams(temperature=1.3, top_k=20, seed=2), stop=["e"]),
        Request(stop_case.prompt, 44, stop=[picked[0], "zzzz-never"]),
        Request(cases[11].prompt, 33, sampling=SamplingParams(temperature=0.5, top_k=50, top_p=0.8, seed=3),
                eos_ids=()),
        Request(cases[19].prompt, 21, sampling=SamplingParams(temperature=1.0, seed=4)),
    ]


def solo_results(backend, cases, mode, draft_len, tokenizer, requests) -> list[tuple]:
    results = []
    for request in requests:
        engine = make_engine(backend, cases, mode, draft_len, tokenizer)
        (result,) = engine.generate([request])
        assert_stats_consistent(result, draft_len)
        results.append(comparable(result))
    return results


I4_SETTINGS = [("qwen2", 8), ("qwen3", 4), ("llama", 16)]


@pytest.mark.parametrize("family,draft_len", I4_SETTINGS)
def test_i4_ragged_batch_equals_each_request_alone(family, draft_len, tiny_backends, oracles, tokenizers):
    cases, tokenizer, backend = oracles[family], tokenizers[family], tiny_backends[family]
    requests = ragged_requests(cases, tokenizer)
    solo = solo_results(backend, cases, "mixed", draft_len, tokenizer, requests)
    engine = make_engine(backend, cases, "mixed", draft_len, tokenizer)
    batched = engine.generate(requests)
    assert [comparable(r) for r in batched] == solo
    # the batch really is ragged: rows finish at different forwards, acceptance differs
    assert len({s[3] for s in solo}) >= 3
    assert len({tuple(s[7]) for s in solo}) >= 3
    assert {s[2] for s in solo} == {"stop", "length"}
    # greedy rows still follow the oracle (eos and stop-string rows are cut short)
    for request, result in zip(requests, batched):
        if request.sampling.greedy:
            case = next(c for c in cases if c.prompt == list(request.prompt_ids))
            assert result.token_ids == case.continuation[:len(result.token_ids)]


@pytest.mark.parametrize("family,draft_len", I4_SETTINGS)
def test_i4_rows_joining_between_steps_equal_each_request_alone(family, draft_len, tiny_backends, oracles,
                                                               tokenizers):
    """Continuous batching: requests join via add() while others run and leave as they finish."""
    cases, tokenizer, backend = oracles[family], tokenizers[family], tiny_backends[family]
    requests = [dataclasses.replace(r, request_id=i) for i, r in enumerate(ragged_requests(cases, tokenizer))]
    solo = solo_results(backend, cases, "mixed", draft_len, tokenizer, requests)
    engine = make_engine(backend, cases, "mixed", draft_len, tokenizer)
    joins = {0: requests[:2], 1: requests[2:3], 3: requests[3:5], 5: requests[5:]}  # step -> arrivals
    step, sizes, deltas = 0, [], []
    while engine.rows or step <= max(joins):
        if step in joins:
            deltas += engine.add(joins[step])
        sizes.append(len(engine.rows))
        deltas += engine.step()
        step += 1
    results = sorted((d.result for d in deltas if d.finished), key=lambda r: r.request_id)
    assert [comparable(r) for r in results] == solo
    assert max(sizes) >= 3 and len(set(sizes)) >= 3  # the batch grew and shrank
    # the emptied engine (no rows, no cache) takes new work
    assert not engine.rows and engine.cache.batch == 0
    deltas = engine.add(requests[:1])
    while engine.rows:
        deltas += engine.step()
    assert [comparable(d.result) for d in deltas if d.finished] == solo[:1]


# ---------------------------------------------------------------------------- stop conditions, streaming
def first_fresh_token(tokens: list[int], start: int) -> tuple[int, int]:
    """(index, token) of the first token at or after `start` that does not occur before it."""
    for index in range(start, len(tokens)):
        if tokens[index] not in tokens[:index] and tokens[index] != EOS_ID:
            return index, tokens[index]
    raise AssertionError("no fresh token in the continuation")


def first_stop(tokenizer: Tokenizer, tokens: list[int], stop: str) -> tuple[list[int], str] | None:
    """Independent statement of the stop-string rule: the shortest token prefix whose text
    contains `stop`, and that text cut before it."""
    for count in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:count])
        if stop in text:
            return tokens[:count], text[:text.index(stop)]
    return None


def pick_stop_string(tokenizer: Tokenizer, tokens: list[int], after: int, length: int = 3):
    """(stop, expected tokens, expected text): a printable string first occurring in the decoded
    `tokens` past the text of the first `after` tokens."""
    full = tokenizer.decode(tokens)
    for start in range(len(tokenizer.decode(tokens[:after])), len(full) - length):
        stop = full[start:start + length]
        if full.find(stop) != start or not stop.isprintable() or "\ufffd" in stop or not stop.strip():
            continue
        hit = first_stop(tokenizer, tokens, stop)
        if hit is not None and hit[1] == full[:start]:
            return stop, hit[0], hit[1]
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_stops_and_is_included(family, tiny_backends, hf_models, oracles):
    """eos ids chosen from the oracle (first occurrences) land inside forced 16-token steps; the
    output equals HF generate with that eos id, ends with it, and nothing after it is kept."""
    cases, draft_len = oracles[family], 16
    for case in cases[::4]:
        index, token = first_fresh_token(case.continuation, start=3 + len(case.prompt) % 9)
        assert index % draft_len != 0  # not the last token of a step: the step commits past it
        engine = make_engine(tiny_backends[family], cases, "forced", draft_len)
        (result,) = engine.generate([Request(case.prompt, 48, eos_ids=(token,))])
        reference = hf_greedy(hf_models[family], case.prompt, 48, eos_id=token)
        assert result.token_ids == reference == case.continuation[:index + 1]
        assert result.finish_reason == "stop"
        assert result.stats.forward_passes == 1 + math.ceil(index / draft_len)
    # eos as the very first token: that row ends at its prefill while the other runs on
    first, other = cases[1], cases[2]
    engine = make_engine(tiny_backends[family], cases, "forced", draft_len)
    results = engine.generate([Request(first.prompt, 48, eos_ids=(first.continuation[0],)),
                               Request(other.prompt, 20)])
    assert [r.token_ids for r in results] == [first.continuation[:1], other.expected(20)]
    assert [r.finish_reason for r in results] == ["stop", finish_reason_for(other.expected(20))]
    assert [r.stats.forward_passes for r in results] == [1, 1 + math.ceil(19 / draft_len)]


@pytest.mark.parametrize("family", FAMILIES)
def test_max_new_tokens_trims_inside_a_step(family, tiny_backends, oracles):
    cases, draft_len = oracles[family], 16
    case = next(c for c in cases if EOS_ID not in c.continuation[:40])
    for max_new in (1, 2, 16, 17, 20, 33, 40):
        engine = make_engine(tiny_backends[family], cases, "forced", draft_len)
        (result,), (deltas,) = run_streamed(engine, [Request(case.prompt, max_new)])
        assert result.token_ids == case.continuation[:max_new]
        assert result.finish_reason == "length"
        assert result.stats.forward_passes == 1 + math.ceil((max_new - 1) / draft_len)
        assert_stream_consistent(result, deltas)
        assert_stats_consistent(result, draft_len)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_strings_cut_the_text(family, tiny_backends, oracles, tokenizers):
    """Stop strings picked from the decoded oracle output: text ends right before the stop
    string, token ids are the shortest prefix containing it, finish_reason == 'stop', and no
    streamed text ever shows the stop string."""
    cases, tokenizer, draft_len = oracles[family], tokenizers[family], 8
    checked = 0
    for case in cases:
        picked = pick_stop_string(tokenizer, case.continuation[:48], after=3)
        if picked is None:
            continue
        stop, tokens, text = picked
        engine = make_engine(tiny_backends[family], cases, "forced", draft_len, tokenizer)
        (result,), (deltas,) = run_streamed(engine, [Request(case.prompt, 48, stop=["never-seen", stop])])
        assert (result.token_ids, result.text, result.finish_reason) == (tokens, text, "stop")
        assert stop not in "".join(d.text for d in deltas)
        assert result.stats.forward_passes == 1 + math.ceil((len(tokens) - 1) / draft_len)
        assert_stream_consistent(result, deltas)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("family,draft_len", [("qwen2", 4), ("qwen3", 16), ("llama", 8)])
def test_streaming_and_stats_in_a_batch(family, draft_len, tiny_backends, oracles, tokenizers):
    """Deltas of a ragged streamed batch concatenate to each result; one finished delta per
    request; forward_passes == forwards the request took part in (counted by the backend)."""
    cases, tokenizer = oracles[family], tokenizers[family]
    requests = ragged_requests(cases, tokenizer)
    engine = make_engine(tiny_backends[family], cases, "mixed", draft_len, tokenizer)
    results, deltas = run_streamed(engine, requests)
    participants = engine.backend.participants
    for request, result, request_deltas in zip(requests, results, deltas):
        assert_stream_consistent(result, request_deltas)
        assert_stats_consistent(result, draft_len)
        took_part = sum(tuple(request.prompt_ids) in forward for forward in participants)
        assert result.stats.forward_passes == took_part
        full = tokenizer.decode(result.token_ids)
        cut = min((full.find(s) for s in request.stop if s in full), default=len(full))
        assert result.text == full[:cut]
        if result.finish_reason == "stop" and not request.stop:
            assert result.token_ids[-1] in (request.eos_ids if request.eos_ids is not None else (EOS_ID,))


@pytest.mark.parametrize("family", FAMILIES)
def test_deltas_are_values_of_their_own(family, tiny_backends, oracles):
    """A delta never changes after it is made (the deltas held from every step equal copies
    taken when they arrived), and nothing a consumer does to one changes the engine's output;
    the final delta's Result totals are the sums of the per-step increments, also when the
    draft length changes between steps."""
    cases = oracles[family]
    engine = make_engine(tiny_backends[family], cases, "mixed", 4)
    requests = [Request(case.prompt, NEW_TOKENS["mixed"], request_id=i) for i, case in enumerate(cases[:3])]
    held, copies = [], []

    def receive(deltas: list[Delta]) -> None:
        held.extend(deltas)
        copies.extend(copy.deepcopy(deltas))
        for delta in deltas:  # a careless consumer: the engine must not notice
            delta.token_ids.append(-1)
            delta.step_stats.proposed_per_position.append(77)
            if delta.result is not None:
                delta.result.token_ids.clear()
                delta.result.stats.accepted_per_position.append(99)

    receive(engine.add(requests))
    for draft_len in itertools.cycle((4, 8, 2, 16, 0, 3)):
        if not engine.rows:
            break
        engine.set_draft_len(draft_len)
        receive(engine.step())
    for delta, snapshot in zip(held, copies):  # undo the consumer's own edits; the rest is as it arrived
        delta.token_ids.pop()
        assert delta.step_stats.proposed_per_position.pop() == 77
        if delta.result is not None:
            assert delta.result.stats.accepted_per_position.pop() == 99
            delta.result.token_ids[:] = snapshot.result.token_ids
    assert held == copies
    for request, case in zip(requests, cases):
        deltas = [d for d in copies if d.request_id == request.request_id]
        result = deltas[-1].result
        assert result.token_ids == case.expected(request.max_new_tokens)  # the consumer's edits changed nothing
        assert_stream_consistent(result, deltas)
        assert sum(d.step_stats.accepted_tokens for d in deltas) > 0  # the hook accepted proposals
        assert len({len(d.step_stats.accepted_per_position) for d in deltas[1:]}) >= 3  # lengths changed


def test_generate_returns_results_in_request_order_for_equal_requests(tiny_backends, oracles):
    """The same Request object twice, and equal but distinct ones, interleaved with others that
    finish earlier: one distinct Result per request, each at its request's index."""
    cases = oracles["qwen2"]
    engine = make_engine(tiny_backends["qwen2"], cases, "mixed", 4)
    long, short = Request(cases[5].prompt, 30), Request(cases[9].prompt, 5)
    requests = [long, short, long, dataclasses.replace(long), short, dataclasses.replace(short), long]
    for _ in range(2):  # a second call on the same engine, in the other order
        results = engine.generate(requests)
        assert len(results) == len(requests) and len({id(r) for r in results}) == len(results)
        for request, result in zip(requests, results):
            assert result.request is request
            assert result.token_ids == cases[5 if request == long else 9].expected(request.max_new_tokens)
        requests = requests[::-1]


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("draft_len", [-1, 17, 100, 2.5, True])
def test_bad_draft_len_is_rejected(draft_len, tiny_backends):
    with pytest.raises(RequestError, match="draft_len"):
        DecodeEngine(tiny_backends["qwen2"], draft_len=draft_len)


@pytest.mark.parametrize("draft_len", [0, 16])
def test_draft_len_bounds_are_accepted(draft_len, tiny_backends):
    assert DecodeEngine(tiny_backends["qwen2"], draft_len=draft_len).draft_len == draft_len


@pytest.mark.parametrize("draft_len", [4, 16])
def test_lossless_up_to_the_position_limit(draft_len, tiny_backends, hf_models):
    """Near max_position_embeddings the masks of a step may sit past the limit (they only
    draft); the committed tokens still equal AR right up to a total length of the limit."""
    backend, hf = tiny_backends["qwen2"], hf_models["qwen2"]
    limit = backend.config.max_position_embeddings
    prompt = [3 + (11 * i) % 500 for i in range(limit - 37)]
    reference = hf_greedy(hf, prompt, 37, eos_id=-1)
    result = DecodeEngine(backend, draft_len=draft_len).generate([Request(prompt, 100, eos_ids=())])[0]
    assert result.token_ids == reference and len(prompt) + len(result.token_ids) == limit
    assert result.finish_reason == "length"

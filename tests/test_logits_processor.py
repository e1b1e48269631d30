"""Penalties, min_tokens, bad words and log probs in the draft-verify loop (docs/design.md §3.7).

Oracles, each independent of runtime/logits_processor.py:
- `transformers` generate() with RepetitionPenaltyLogitsProcessor, MinNewTokensLengthLogitsProcessor
  and NoBadWordsLogitsProcessor (greedy, fp32, random tiny checkpoints): DecodeEngine's greedy
  tokens at draft lengths 0, 4 and 8 equal them token for token;
- for presence / frequency penalties (and everything together, sampled), `reference`: AR decoding
  written out here, one full `transformers` forward per token, the processing done per token in
  plain Python in TensorRT-LLM's order (temperature, repetition, presence, frequency, min_tokens,
  bad words, top-k) and the pick of runtime/sampling.py's rule (argmax of scores + G(seed,
  position, token)); its log-softmax at each picked token is the log-prob oracle (1e-5, fp32).
Seeded rows give the same tokens at draft lengths 0, 1, 4 and 16, and SamplingParams refuses bad
settings by name. One device->host transfer per step with processors on is in test_decode_step.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor)

from tidar.runtime.generate import DecodeEngine, Request, RequestError
from tidar.runtime.sampling import SamplingError, SamplingParams, gumbel_noise, seed_key

NEW_TOKENS = 24
FAMILIES = ("qwen2", "llama")


def prompts(vocab: int, count: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (4, 11, 19)][:count]


def hf_greedy(model, prompt, processors, eos_id=None, max_new_tokens=NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             logits_processor=LogitsProcessorList(processors), eos_token_id=eos_id, pad_token_id=1)
    return out[0, len(prompt):].tolist()


def engine_tokens(backend, requests, draft_len) -> list[list[int]]:
    return [r.token_ids for r in DecodeEngine(backend, draft_len=draft_len).generate(requests)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_repetition_penalty_equals_transformers(family, tiny_backends, hf_models):
    backend, hf = tiny_backends[family], hf_models[family]
    batch = prompts(backend.config.vocab_size)
    plain = [hf_greedy(hf, p, []) for p in batch]
    expected = [hf_greedy(hf, p, [RepetitionPenaltyLogitsProcessor(1.6)]) for p in batch]
    assert expected != plain  # the penalty changes the output, so the comparison can fail
    for draft_len in (0, 4, 8):
        requests = [Request(p, NEW_TOKENS, SamplingParams(repetition_penalty=1.6), eos_ids=()) for p in batch]
        assert engine_tokens(backend, requests, draft_len) == expected, f"b={draft_len}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_min_tokens_equals_transformers(family, tiny_backends, hf_models):
    """The end id is a token plain greedy decoding generates early (at index i, its first
    occurrence): min_tokens = i + 3 bans it for the first i + 3 tokens, as transformers'
    MinNewTokensLengthLogitsProcessor does."""
    backend, hf = tiny_backends[family], hf_models[family]
    for prompt in prompts(backend.config.vocab_size):
        plain = hf_greedy(hf, prompt, [])
        first = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
        eos, least = plain[first], first + 3
        assert len(hf_greedy(hf, prompt, [], eos_id=eos)) == first + 1
        expected = hf_greedy(hf, prompt, [MinNewTokensLengthLogitsProcessor(len(prompt), least, eos)], eos_id=eos)
        assert len(expected) > least and eos not in expected[:least]
        for draft_len in (0, 4, 8):
            request = Request(prompt, NEW_TOKENS, SamplingParams(min_tokens=least), eos_ids=(eos,))
            assert engine_tokens(backend, [request], draft_len) == [expected], f"b={draft_len}"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_bad_words_equal_transformers(family, tiny_backends, hf_models):
    """One-, two- and three-token words taken from plain greedy output, and a word whose prefix
    is the prompt's last token (the context includes the prompt, as in TensorRT-LLM)."""
    backend, hf = tiny_backends[family], hf_models[family]
    for prompt in prompts(backend.config.vocab_size):
        plain = hf_greedy(hf, prompt, [])
        for words in ([[plain[1]]], [[plain[3], plain[4]], [plain[6], plain[7], plain[8]]],
                      [[prompt[-1], plain[0]], [plain[2]]]):
            expected = hf_greedy(hf, prompt, [NoBadWordsLogitsProcessor(words)])
            assert expected != plain, words
            for draft_len in (0, 4, 8):
                request = Request(prompt, NEW_TOKENS, SamplingParams(bad_words=words), eos_ids=())
                assert engine_tokens(backend, [request], draft_len) == [expected], f"b={draft_len} {words}"


# ------------------------------------------------------------------ the per-token reference
def processed(logits: torch.Tensor, sequence: list[int], generated: int, params: SamplingParams,
              eos_ids: tuple[int, ...]) -> torch.Tensor:
    """One position's processed scores (float32 [V]), token by token in TensorRT-LLM's order."""
    temperature = params.temperature if params.temperature > 0 else 1.0
    scores = (logits.float() / temperature).tolist()
    for token in set(sequence):
        count = sequence.count(token)
        x = scores[token]
        x = x * params.repetition_penalty if x < 0 else x / params.repetition_penalty
        scores[token] = x - params.presence_penalty - params.frequency_penalty * count
    if generated < params.min_tokens:
        for token in eos_ids:
            scores[token] = -math.inf
    for word in params.bad_words:
        if len(word) == 1 or tuple(sequence[len(sequence) - len(word) + 1:]) == tuple(word[:-1]):
            scores[word[-1]] = -math.inf
    scores = torch.tensor(scores)
    if params.top_k:
        kth = torch.sort(scores, descending=True).values[params.top_k - 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    return scores


def reference(hf, prompt: list[int], params: SamplingParams, eos_ids: tuple[int, ...] = (),
              new_tokens: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """AR decoding with one full forward per token; (tokens, log probs of the processed
    distribution at each, 0 for greedy)."""
    sequence, tokens, log_probs = list(prompt), [], []
    for generated in range(new_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([sequence])).logits[0, -1]
        scores = processed(logits, sequence, generated, params, eos_ids)
        if params.greedy:
            token, log_prob = int(scores.argmax()), 0.0
        else:
            noise = gumbel_noise(torch.tensor([seed_key(params.seed)]), torch.tensor([[len(sequence)]]),
                                 scores.shape[-1])[0, 0]
            token = int((scores + noise).argmax())
            log_prob = float(torch.log_softmax(scores, -1)[token])
        sequence.append(token)
        tokens.append(token)
        log_probs.append(log_prob)
        if token in eos_ids:
            break
    return tokens, log_probs


SETTINGS = {
    "presence": SamplingParams(presence_penalty=1.5),
    "frequency": SamplingParams(frequency_penalty=0.7),
    "everything greedy": SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3,
                                        min_tokens=5, bad_words=((11,), (40, 41))),
    "everything sampled": SamplingParams(temperature=0.8, top_k=40, seed=5, repetition_penalty=1.3,
                                         presence_penalty=0.4, frequency_penalty=0.3, min_tokens=5,
                                         bad_words=((11,), (40, 41))),
    "penalties sampled": SamplingParams(temperature=1.2, seed=2 ** 64 - 1, presence_penalty=-0.3,
                                        frequency_penalty=0.9),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_processors_equal_the_per_token_reference_for_every_draft_length(name, tiny_backends, hf_models):
    """Tokens equal the reference at draft lengths 0, 1, 4 and 16 (so a seeded row's output does
    not depend on the draft length), log probs within 1e-5."""
    backend, hf = tiny_backends["qwen2"], hf_models["qwen2"]
    params, changed = SETTINGS[name], False
    for prompt in prompts(backend.config.vocab_size, 2):
        eos = (0,)
        expected, expected_log_probs = reference(hf, prompt, params, eos)
        plain, _ = reference(hf, prompt, SamplingParams(temperature=params.temperature, top_k=params.top_k,
                                                        seed=params.seed), eos)
        changed |= expected != plain
        for draft_len in (0, 1, 4, 16):
            engine = DecodeEngine(backend, draft_len=draft_len)
            result = engine.generate([Request(prompt, NEW_TOKENS, params, eos_ids=eos, return_log_probs=True)])[0]
            assert result.token_ids == expected, f"b={draft_len}"
            assert result.log_probs == pytest.approx(expected_log_probs, abs=1e-5), f"b={draft_len}"
    assert changed  # the processors matter here


def test_rows_with_and_without_processors_batch_row_by_row(tiny_backends):
    """A batch mixing rows with processors, plain rows and log-prob rows (joining at two steps,
    the draft length changing) gives each row its solo output."""
    backend = tiny_backends["llama"]
    batch = prompts(backend.config.vocab_size)
    requests = [Request(p, NEW_TOKENS, params, eos_ids=(0,), request_id=i, return_log_probs=i % 2 == 0)
                for i, (p, params) in enumerate(zip(batch * 2, [SamplingParams(), *SETTINGS.values()]))]
    solo = {r.request_id: DecodeEngine(backend, draft_len=4).generate([r])[0] for r in requests}
    engine = DecodeEngine(backend, draft_len=4)
    finals = engine.add(requests[:3])
    for step, draft_len in enumerate((8, 0, 3, 16, 1, 4) * 10):
        if step == 2:
            finals += engine.add(requests[3:])
        if not engine.rows:
            break
        engine.set_draft_len(draft_len)
        finals += engine.step()
    got = {delta.request_id: delta.result for delta in finals if delta.finished}
    for request in requests:
        assert got[request.request_id].token_ids == solo[request.request_id].token_ids, request.request_id
        if request.return_log_probs:
            assert got[request.request_id].log_probs == pytest.approx(solo[request.request_id].log_probs, abs=1e-5)
        else:
            assert got[request.request_id].log_probs is None


def test_log_probs_stream_with_their_tokens(tiny_backends):
    backend = tiny_backends["qwen3"]
    request = Request(prompts(backend.config.vocab_size, 1)[0], 12, SETTINGS["everything sampled"], eos_ids=(),
                      return_log_probs=True)
    deltas = [d for step in DecodeEngine(backend, draft_len=4).stream([request]) for d in step]
    assert all(len(d.log_probs) == len(d.token_ids) for d in deltas)
    assert sum(len(d.token_ids) for d in deltas) == 12 and all(lp <= 0 for d in deltas for lp in d.log_probs)


@pytest.mark.parametrize("values,message", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(presence_penalty=math.nan), "presence_penalty must be a finite number"),
    (dict(frequency_penalty="1"), "frequency_penalty must be a finite number"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=2.5), "min_tokens"),
    (dict(bad_words=[[]]), "bad_words must hold non-empty sequences"),
    (dict(bad_words=[[3, -1]]), "bad_words must hold non-empty sequences"),
    (dict(bad_words="no"), "bad_words must be a list of token-id sequences"),
    (dict(bad_words=[list(range(3, 40))]), "has 37 tokens, more than 32"),
])
def test_bad_settings_are_named(values, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**values)


def test_bad_word_outside_the_vocabulary_is_named(tiny_backends):
    backend = tiny_backends["qwen2"]
    engine = DecodeEngine(backend, draft_len=4)
    with pytest.raises(RequestError, match=r"bad_words entry \[5, 99999\] holds a token id outside the vocabulary"):
        engine.add([Request([5, 6], 4, SamplingParams(bad_words=[[5, 99999]]))])
    assert SamplingParams(bad_words=[[5, 6]]).bad_words == ((5, 6),)


@pytest.mark.parametrize("draft_len", [4, 16])
def test_unseeded_rows_verify_with_processors_and_report_their_tokens_log_probs(draft_len, tiny_backends, hf_models):
    """Unseeded sampled rows verify by residual speculative sampling (docs/design.md §3.5), whose
    tokens differ from the coupled reference; still every reported log prob is that of its token
    under the processed distribution of its prefix (teacher-forced recomputation, 1e-5), and the
    processors' bans hold (no end id before min_tokens, no bad word)."""
    backend, hf = tiny_backends["qwen2"], hf_models["qwen2"]
    params = dataclasses.replace(SETTINGS["everything sampled"], seed=None)
    torch.manual_seed(3)
    engine = DecodeEngine(backend, draft_len=draft_len)
    for prompt in prompts(backend.config.vocab_size, 2):
        result = engine.generate([Request(prompt, NEW_TOKENS, params, eos_ids=(0,), return_log_probs=True)])[0]
        sequence = list(prompt)
        for generated, (token, log_prob) in enumerate(zip(result.token_ids, result.log_probs)):
            with torch.no_grad():
                logits = hf(torch.tensor([sequence])).logits[0, -1]
            scores = processed(logits, sequence, generated, params, (0,))
            assert scores[token] > -math.inf, f"token {token} was banned at output position {generated}"
            assert log_prob == pytest.approx(float(torch.log_softmax(scores, -1)[token]), abs=1e-5)
            sequence.append(token)

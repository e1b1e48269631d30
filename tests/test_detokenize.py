"""Incremental detokenisation: each committed token is decoded once, by
`tokenizers`' DecodeStream, so the per-step host cost does not grow with the output; stop
strings are searched in the new tail only and still cut the text where a full decode would.

Oracle: `Tokenizer.decode` of the whole output, once, after the fact. The generation is 4,000
tokens long, driven by a stand-in backend whose logits spell a fixed multilingual text over
and over (no model: the point is the host side). Instead of timing the first and last 500
steps (the project keeps timings out of unit tests), the test counts the work: no full
decode during generation (at the end, ids still waiting to complete a character are decoded
with a few ids of context), and exactly one DecodeStream step per committed token.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fakes.logits_backend import LogitsBackend
from tidar import BUNDLED_MODEL
from tidar.runtime import tokenizer as tokenizer_module
from tidar.runtime.cache import KVCache
from tidar.runtime.config import TiDARConfig
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer

TEXT = "def grüße(x):\n    return '✓ naïve → ok'  # 日本語\n"
LENGTH = 4000


class SpellingBackend(LogitsBackend):
    """Logits whose argmax at absolute position p is spelling[p % len(spelling)]: the AR output
    at position p predicts p + 1, a mask at position p predicts p."""

    def __init__(self, config: TiDARConfig, spelling: list[int]):
        self.config, self.spelling = config, torch.tensor(spelling)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(1, batch, 1, capacity, 1)

    def logits(self, input_ids, layout, cache):
        positions = layout.position_ids(cache.lengths)
        predicted = positions + (torch.arange(layout.num_new) < layout.causal_len).long()
        targets = self.spelling[predicted % len(self.spelling)]
        return torch.nn.functional.one_hot(targets, self.config.vocab_size).float()


@pytest.fixture(scope="module")
def setup():
    tokenizer = Tokenizer(BUNDLED_MODEL)
    config = dataclasses.replace(TiDARConfig.from_file(BUNDLED_MODEL), max_position_embeddings=2 * LENGTH)
    spelling = tokenizer.encode(TEXT)
    return tokenizer, SpellingBackend(config, spelling), spelling


@pytest.mark.parametrize("draft_len", [0, 8])
def test_long_output_decodes_each_token_once(setup, monkeypatch, draft_len):
    tokenizer, backend, spelling = setup
    steps = []

    class CountingStream:
        def __init__(self, **options):
            self.stream = original_stream(**options)

        def step(self, tok, token_id):
            steps.append(token_id)
            return self.stream.step(tok, token_id)

    full_decodes, original_stream = [], tokenizer_module.DecodeStream
    original_decode = Tokenizer.decode
    monkeypatch.setattr(tokenizer_module, "DecodeStream", CountingStream)
    monkeypatch.setattr(Tokenizer, "decode",
                        lambda self, ids: full_decodes.append(len(ids)) or original_decode(self, ids))
    engine = DecodeEngine(backend, tokenizer, draft_len=draft_len)
    request = Request(spelling[:5], LENGTH, eos_ids=())
    deltas = [d for batch in engine.stream([request]) for d in batch]
    streamed, result = "".join(d.text for d in deltas), deltas[-1].result
    assert len(result.token_ids) == LENGTH and all(n <= 16 for n in full_decodes)  # flush: a short tail at most
    assert steps == result.token_ids  # each committed token decoded once, in order
    monkeypatch.undo()
    assert result.text == streamed == tokenizer.decode(result.token_ids)


def test_stop_string_deep_in_a_long_output(setup):
    """A stop string that first completes near token 3,900 ends the output there: the text is the
    full decode cut before it, the tokens the shortest prefix whose decode contains it."""
    tokenizer, backend, spelling = setup
    marker = tokenizer.encode(" <ZQX marker ✓>")
    repeats = 3900 // len(spelling)
    long_spelling = spelling * repeats + marker + spelling * 10
    backend = SpellingBackend(backend.config, long_spelling)
    stop = "ZQX mark"  # spans several tokens
    engine = DecodeEngine(backend, tokenizer, draft_len=4)
    free = engine.generate([Request(long_spelling[:5], LENGTH, eos_ids=())])[0]
    full = tokenizer.decode(free.token_ids)
    assert full.count(stop) == 1
    result = engine.generate([Request(long_spelling[:5], LENGTH, stop=(stop,), eos_ids=())])[0]
    count = next(n for n in range(3800, LENGTH + 1) if stop in tokenizer.decode(free.token_ids[:n]))
    assert count > 3800 and result.finish_reason == "stop"
    assert result.text == full[:full.find(stop)] and result.token_ids == free.token_ids[:count]

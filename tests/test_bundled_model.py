"""The bundled model (models/tidar-stdlib-qwen2) as a regression gate: transformers loads it as
a plain AR model, TiDAR greedy output equals transformers' greedy output with the model's own
(partly accepted) drafts, and acceptance does not collapse (golden T/NFE with a tolerance, as
vLLM's and TensorRT-LLM's acceptance-length tests do)."""

from __future__ import annotations

import copy

import pytest
import torch

from tidar import BUNDLED_MODEL
from tidar.runtime.bench import heldout_prompts
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer

# Measured by `tidar bench` (8 prompts x 128 tokens): T/NFE 1.65 at b = 4, 1.70 at b = 16.
# The gate sits well below, on fewer prompts, so only a real collapse trips it.
MIN_TOKENS_PER_FORWARD = {4: 1.35, 16: 1.35}


@pytest.fixture(scope="module")
def bundled():
    if not (BUNDLED_MODEL / "model.safetensors").is_file():
        pytest.fail(f"the bundled model is missing from {BUNDLED_MODEL}")
    backend = TorchBackend.load(BUNDLED_MODEL, dtype="float32")
    tokenizer = Tokenizer(BUNDLED_MODEL)
    return backend, tokenizer, heldout_prompts(BUNDLED_MODEL, tokenizer, 4, 64)


@pytest.mark.parametrize("draft_len", [4, 16])
def test_tidar_equals_transformers_greedy_and_acceptance_holds(bundled, draft_len):
    transformers = pytest.importorskip("transformers")
    backend, _, prompts = bundled
    hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id, config.pad_token_id = None, 1  # run to the length, as eos_ids=() does
    config.do_sample, config.max_new_tokens = False, 48
    engine = DecodeEngine(backend, draft_len=draft_len)
    results = engine.generate([Request(p, 48, eos_ids=()) for p in prompts])
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([prompt])
        reference = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert result.token_ids == reference[0, len(prompt):].tolist()
    tokens = sum(len(r.token_ids) for r in results)
    forwards = sum(r.stats.forward_passes for r in results)
    assert tokens / forwards >= MIN_TOKENS_PER_FORWARD[draft_len]
    assert sum(r.stats.accepted_tokens for r in results) > 0


def test_acceptance_file_matches_the_model(bundled):
    from tidar.runtime.autotune import load_acceptance

    backend, _, _ = bundled
    rates = load_acceptance(BUNDLED_MODEL, backend.config.block_size)
    assert rates is not None and len(rates) == backend.config.block_size - 1
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # "all of the first i accepted" can only shrink

"""Choose the draft length by measurement: step latency on this device and backend, times the
model's measured acceptance.

A step of draft length b commits E[a | b] = 1 + sum_{i=1}^{b-1} P(d_1..d_i all accepted)
tokens and costs latency(b), which grows with its b(b+1) query tokens once they stop being
"free". The best draft length maximizes E[a | b] / latency(b) (expected tokens per second).

Acceptance comes from `acceptance.json` in the checkpoint folder (written by `tidar bench`,
measured on held-out prompts at the full block size); without it, a short calibration run on
generic prompts measures it. P(d_1..d_i accepted) measured at the full block size is used for
every shorter b (the model drafts each block in one shot, so a shorter block proposes close
to the same tokens; `tidar bench` checks the choice against measured tokens/s).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .backend import Backend
from .layout import Layout

ACCEPTANCE_FILE = "acceptance.json"
CALIBRATION_PROMPTS = ("import os\n", "def main():\n    ", "class Config:\n    def __init__(self", "# ", "for i in range(")


@dataclass
class DraftChoice:
    draft_len: int
    expected_tokens_per_step: dict[int, float]
    step_seconds: dict[int, float]
    acceptance: list[float]
    """acceptance[i]: probability that drafts d_1..d_{i+1} are all accepted."""

    @property
    def expected_tokens_per_second(self) -> dict[int, float]:
        return {b: self.expected_tokens_per_step[b] / self.step_seconds[b] for b in self.step_seconds}


def expected_tokens(acceptance: list[float], draft_len: int) -> float:
    """E[committed tokens per step] at draft length `draft_len` (0 and 1 commit exactly one)."""
    return 1.0 + sum(acceptance[: max(draft_len - 1, 0)])


def device_sync(output: torch.Tensor) -> None:
    """Wait for the device that computed `output` (CUDA kernels run asynchronously: without this
    the clock stops while the last layers may still be running)."""
    if output.device.type == "cuda":
        torch.cuda.synchronize(output.device)


def measure_step_seconds(backend: Backend, draft_lens: list[int], batch: int = 1, past_len: int = 128,
                         repeats: int = 15) -> dict[int, float]:
    """Median latency of one decode forward per draft length, on a cache holding `past_len` tokens.
    The draft lengths are timed round-robin, so drift of the machine's speed during the
    measurement falls on all of them alike."""
    config = backend.config
    setups = {}
    for b in draft_lens:
        layout = Layout.decode(b)
        cache = backend.new_cache(batch, past_len + layout.num_new)
        cache.commit([past_len] * batch)
        tokens = torch.full((batch, layout.num_new), config.mask_token_id, dtype=torch.long)
        backend.forward(tokens, layout, cache)  # warm-up
        setups[b] = (tokens, layout, cache)
    times: dict[int, list[float]] = {b: [] for b in draft_lens}
    for _ in range(repeats):
        for b, (tokens, layout, cache) in setups.items():
            start = time.perf_counter()
            device_sync(backend.forward(tokens, layout, cache))
            times[b].append(time.perf_counter() - start)
    return {b: statistics.median(t) for b, t in times.items()}


def acceptance_from_stats(accepted_per_position: list[int], drafts: int) -> list[float]:
    """P(d_1..d_i all accepted) from the engine's counters (accepting stops at the first miss,
    so the count at position i is already the count of 'all of the first i accepted')."""
    return [count / drafts for count in accepted_per_position] if drafts else [0.0] * len(accepted_per_position)


def load_acceptance(folder: str | Path, block_size: int) -> list[float] | None:
    path = Path(folder) / ACCEPTANCE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rates = data.get("acceptance")
    if not isinstance(rates, list) or len(rates) != block_size - 1:
        return None
    return [float(r) for r in rates]


def calibrate_acceptance(backend: Backend, tokenizer, max_new_tokens: int = 48) -> list[float]:
    """Measure acceptance at the full block size by greedy generation from generic prompts."""
    from .generate import DecodeEngine, Request

    engine = DecodeEngine(backend, tokenizer, draft_len=backend.config.block_size)
    results = engine.generate([Request(tokenizer.encode(p), max_new_tokens) for p in CALIBRATION_PROMPTS])
    drafts = sum(r.stats.drafts for r in results)
    totals = [sum(col) for col in zip(*(r.stats.accepted_per_position for r in results))]
    return acceptance_from_stats(totals, drafts)


def measure_engine_step_seconds(backend: Backend, tokenizer, draft_lens: list[int], batch: int = 1,
                                past_len: int = 128, repeats: int = 5) -> dict[int, float]:
    """Median latency of one whole `DecodeEngine.step` (forward, verification, drafting, stop
    checks and detokenization) per draft length, for `batch` rows whose caches hold about
    `past_len` tokens: what a server pays per step, host-side work included. Draft lengths are
    timed round-robin on the same rows (`set_draft_len` between steps)."""
    from .generate import DecodeEngine, Request

    config = backend.config
    generator = torch.Generator().manual_seed(0)
    first_plain = max(config.mask_token_id, *config.eos_token_ids, 2) + 1
    prompts = torch.randint(first_plain, config.vocab_size, (batch, past_len), generator=generator).tolist()
    budget = repeats * (sum(max(b, 1) for b in draft_lens) + len(draft_lens)) + 2
    engine = DecodeEngine(backend, tokenizer, draft_len=max(draft_lens))
    engine.add([Request(prompt, budget, eos_ids=()) for prompt in prompts])
    times: dict[int, list[float]] = {b: [] for b in draft_lens}
    for _ in range(repeats + 1):  # the first round warms up
        for b in draft_lens:
            engine.set_draft_len(b)
            start = time.perf_counter()
            engine.step()
            times[b].append(time.perf_counter() - start)
    return {b: statistics.median(t[1:]) for b, t in times.items()}


@dataclass
class BatchDraftPolicy:
    """The best draft length for each batch size, from step latencies measured per batch size
    (a server's rows share one forward, so the query tokens of a step grow with the batch and the
    best draft length shrinks; 0, plain AR, is a candidate)."""

    acceptance: list[float]
    step_seconds: dict[int, dict[int, float]]
    """step_seconds[batch][b]: measured latency of one step of `batch` rows at draft length b."""

    @classmethod
    def measure(cls, backend: Backend, acceptance: list[float], batch_sizes: list[int],
                draft_lens: list[int], repeats: int = 5, tokenizer=None) -> "BatchDraftPolicy":
        """Time whole engine steps (`measure_engine_step_seconds`) for every batch size."""
        table = {batch: measure_engine_step_seconds(backend, tokenizer, draft_lens, batch=batch, repeats=repeats)
                 for batch in sorted(set(batch_sizes))}
        return cls(acceptance, table)

    def best(self, batch: int) -> int:
        """The draft length with the best expected tokens per second for `batch` rows, using the
        smallest measured batch size that holds them (the largest one beyond the table)."""
        measured = sorted(self.step_seconds)
        size = next((m for m in measured if m >= batch), measured[-1])
        seconds = self.step_seconds[size]
        return max(sorted(seconds), key=lambda b: expected_tokens(self.acceptance, b) / seconds[b])


def choose_draft_len(backend: Backend, acceptance: list[float], batch: int = 1,
                     step_seconds: dict[int, float] | None = None) -> DraftChoice:
    """The draft length (0 = AR included) with the best expected tokens per second."""
    candidates = list(range(0, backend.config.block_size + 1))
    step_seconds = step_seconds or measure_step_seconds(backend, candidates, batch=batch)
    expected = {b: expected_tokens(acceptance, b) for b in candidates}
    best = max(candidates, key=lambda b: expected[b] / step_seconds[b])
    return DraftChoice(best, expected, step_seconds, acceptance)

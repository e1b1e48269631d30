"""Self-distillation for the diffusion half (docs/design.md §2): rollouts, their loss, and a
draft-acceptance estimate.

Verification accepts a draft when it equals the model's own greedy (AR) choice, so the draft
targets that pay are the model's greedy continuations, not the data. A rollout is a prompt
window of the training split (never the held-out split) continued greedily by the model in AR
mode (`DecodeEngine(backend, None, draft_len=0)`, batched, never stopping at eos) to the
training length S. Rollout rows train the diffusion half on the continuation positions only,
optionally with a down-weighted AR loss there; the AR half keeps learning from real data
(docs/design.md §2: pure self-generated data raises acceptance but hurts the AR model).

Rollouts are cached on disk (one file per generation of the pool), so a resumed run reads
them instead of generating them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.model import TiDARModel

from .objective import Losses


@dataclass
class Rollouts:
    """Rows of prompt + the model's greedy continuation."""

    tokens: torch.Tensor
    """[N, S] int64."""
    prompt_len: int
    """Tokens of each row that are data; the rest, S - prompt_len, are the model's own."""


def prompt_windows(stream: torch.Tensor, count: int, prompt_len: int, seed: int) -> torch.Tensor:
    """`count` random windows [count, prompt_len] of a token stream (a pure function of seed)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - prompt_len, (count,), generator=generator)
    return torch.stack([stream[s: s + prompt_len] for s in starts.tolist()]).long()


def spaced_windows(stream: torch.Tensor, count: int, prompt_len: int) -> torch.Tensor:
    """`count` evenly spaced windows (for a fixed evaluation set)."""
    stride = max((stream.numel() - prompt_len) // max(count, 1), 1)
    starts = [min(i * stride, stream.numel() - prompt_len) for i in range(count)]
    return torch.stack([stream[s: s + prompt_len] for s in starts]).long()


def greedy_rollouts(model: TiDARModel, prompts: torch.Tensor, new_tokens: int, batch_size: int) -> Rollouts:
    """Continue each prompt greedily for exactly `new_tokens` tokens with the runtime in AR mode."""
    was_training = model.training
    model.eval()
    engine = DecodeEngine(TorchBackend(model), None, draft_len=0)
    rows = []
    try:
        for start in range(0, prompts.shape[0], batch_size):
            chunk = prompts[start: start + batch_size].tolist()
            results = engine.generate([Request(p, new_tokens, eos_ids=()) for p in chunk])
            rows.extend(r.prompt_ids + r.token_ids for r in results)
    finally:
        model.train(was_training)
    return Rollouts(torch.tensor(rows, dtype=torch.long), prompts.shape[1])


def cached(path: Path, make: Callable[[], Rollouts]) -> Rollouts:
    """The rollouts stored at `path`, else `make()` written there atomically."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return Rollouts(saved["tokens"].long(), int(saved["prompt_len"]))
    rollouts = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"tokens": rollouts.tokens.to(torch.int32), "prompt_len": rollouts.prompt_len}, tmp)
    tmp.replace(path)
    return rollouts


def draft_weights(seq_len: int, block_size: int, decay: float) -> torch.Tensor:
    """[seq_len] weight of each mask of the diffusion half: decay^|j - 1| for the mask at offset j
    of its block, so mask 1 (the first draft verification judges, d_1) weighs most and later
    masks, whose drafts are reached only after every earlier one is accepted, less; decay 1 weighs
    all alike (the plain mean)."""
    offsets = torch.arange(seq_len) % block_size
    return decay ** (offsets - 1).abs().float()


def missed_block_starts(logits: torch.Tensor, tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, S] bool: whether the block holding each position missed its start, i.e. its mask 0's
    argmax differs from x_p at the block's first position p (logits [N, 2S, V] of the full-mask
    objective, tokens [N, S]).

    Decode steps start right after a refused draft, so the blocks the runtime drafts from sit
    mostly where a draft just missed; blocks that miss their own start stand in for those
    (docs/design.md §2, "Where the runtime drafts")."""
    seq_len = tokens.shape[1]
    starts = torch.arange(0, seq_len, block_size, device=tokens.device)
    missed = logits[:, seq_len + starts].argmax(-1) != tokens[:, starts]
    return missed.repeat_interleave(block_size, dim=1)[:, :seq_len]


def rollout_losses(logits: torch.Tensor, tokens: torch.Tensor, prompt_len: int, alpha: float,
                   ar_weight: float, block_size: int = 1, draft_decay: float = 1.0,
                   miss_weight: float = 1.0) -> Losses:
    """Losses of rollout rows on their continuation (positions >= prompt_len) only: diffusion
    (mask i predicts x_i) and AR (x_{i-1} predicts x_i). total = (ar_weight * AR + weighted
    diffusion) / (1 + alpha), the weighting of a real row with alpha replaced by ar_weight; the
    diffusion term of total weighs mask i by `draft_weights` (block_size, draft_decay), times
    `miss_weight` in blocks that missed their start (`missed_block_starts`), normalised by the
    weights' sum, while `Losses.diffusion` reports the plain mean (comparable across settings)."""
    seq_len, vocab = tokens.shape[1], logits.shape[-1]
    ar = F.cross_entropy(logits[:, prompt_len - 1: seq_len - 1].reshape(-1, vocab).float(),
                         tokens[:, prompt_len:].reshape(-1))
    per_mask = F.cross_entropy(logits[:, seq_len + prompt_len:].reshape(-1, vocab).float(),
                               tokens[:, prompt_len:].reshape(-1), reduction="none").view(tokens.shape[0], -1)
    weights = draft_weights(seq_len, block_size, draft_decay)[prompt_len:].to(per_mask.device).expand_as(per_mask)
    if miss_weight != 1.0:
        with torch.no_grad():
            missed = missed_block_starts(logits, tokens, block_size)[:, prompt_len:]
        weights = weights * torch.where(missed, miss_weight, 1.0)
    weighted = (per_mask * weights).sum() / weights.sum()
    return Losses((ar_weight * ar + weighted) / (1.0 + alpha), ar, per_mask.mean())


@torch.no_grad()
def accepted_drafts(model: TiDARModel, tokens: torch.Tensor, prompt_len: int,
                    missed_start: bool = False) -> torch.Tensor:
    """[N, blocks] drafts greedy verification accepts along rollouts `tokens`, from one full-mask
    forward; -1 where a block does not count.

    Block k covers positions p = q + k b .. p + b - 1, q the first multiple of b at or after
    `prompt_len`: it sees x_<p, like the block a decode step drafts from when x_<p is committed.
    Its draft d_j (mask j, j >= 1) is accepted when it equals x_{p+j} and x_{p+j} is the model's
    AR choice there (so the trajectory is the model's own greedy one); acceptance stops at the
    first refusal, as in verification (docs/design.md §3). A block whose d_0 = x_p is not the AR choice
    does not count (the model's greedy path leaves the rollout there). With `missed_start`, a
    counted block whose mask 0 (d_0) differs from x_p holds -2 - its count instead."""
    from .objective import full_mask_inputs

    was_training = model.training
    model.eval()
    b, seq_len = model.config.block_size, tokens.shape[1]
    first = -(-prompt_len // b) * b
    try:
        inputs, layout = full_mask_inputs(tokens, model.config.mask_token_id, b)
        choice = model(inputs.to(model.device), layout).argmax(-1).cpu()
    finally:
        model.train(was_training)
    ar_ok = torch.zeros_like(tokens, dtype=torch.bool)
    ar_ok[:, 1:] = choice[:, : seq_len - 1] == tokens[:, 1:]  # x_i is the AR choice after x_<i
    draft_ok = (choice[:, seq_len:] == tokens) & ar_ok
    blocks = []
    for p in range(first, seq_len - b + 1, b):
        leading = torch.cumprod(draft_ok[:, p + 1: p + b].long(), dim=1).sum(1)
        counted = ar_ok[:, p]
        if missed_start:  # -2 marks a counted block whose mask 0 missed x_p
            leading = torch.where(choice[:, seq_len + p] != tokens[:, p], -2 - leading, leading)
        blocks.append(torch.where(counted, leading, torch.full_like(leading, -1)))
    return torch.stack(blocks, 1) if blocks else torch.zeros(tokens.shape[0], 0, dtype=torch.long)


def _acceptance(accepted: torch.Tensor, b: int) -> dict:
    if accepted.numel() == 0:
        return {"blocks": 0, "accept": [0.0] * (b - 1), "tokens_per_step": 1.0}
    return {"blocks": int(accepted.numel()),
            "accept": [round(float((accepted >= j).float().mean()), 4) for j in range(1, b)],
            "tokens_per_step": round(1.0 + float(accepted.float().mean()), 4)}


def draft_acceptance(model: TiDARModel, rollouts: Rollouts, batch_size: int) -> dict:
    """Acceptance estimate over rollouts (`accepted_drafts`): the share of counted blocks that
    accept at least j drafts (j = 1..b-1) and 1 + the mean accepted count, the tokens per
    decode step at draft length b (prefill aside); `after_miss`: the same over the blocks whose
    mask 0 missed their start, the kind the runtime mostly drafts from (docs/design.md §2)."""
    b = model.config.block_size
    counts = torch.cat([accepted_drafts(model, rollouts.tokens[i: i + batch_size], rollouts.prompt_len,
                                        missed_start=True).flatten()
                        for i in range(0, rollouts.tokens.shape[0], batch_size)])
    missed = counts <= -2
    accepted = torch.where(missed, -2 - counts, counts)
    result = _acceptance(accepted[counts != -1], b)
    result["after_miss"] = _acceptance(accepted[missed], b)
    return result


def runtime_acceptance(model: TiDARModel, prompts: torch.Tensor, new_tokens: int, batch_size: int) -> dict:
    """What the runtime accepts: `DecodeEngine` at (b, k) = (b, b), TiDAR's drafts alone, greedy,
    continuing each prompt by `new_tokens` (batched; rows are batch-invariant, docs/design.md I4).
    {accept: P(d_1..d_j accepted) per step for j = 1..b-1, tokens_per_step}: the figure
    `tidar bench` reports for the same shape."""
    from tidar.runtime import autotune
    from tidar.runtime.replay import tokens_per_decode_step

    was_training = model.training
    model.eval()
    b = model.config.block_size
    engine = DecodeEngine(TorchBackend(model), None, draft_len=b, draft_blocks=b, drafter="tidar")
    accepted, proposed, tokens, steps = [0] * (b - 1), [0] * (b - 1), 0, 0
    try:
        for start in range(0, prompts.shape[0], batch_size):
            chunk = prompts[start: start + batch_size].tolist()
            for result in engine.generate([Request(p, new_tokens, eos_ids=()) for p in chunk]):
                stats = result.stats
                accepted = [a + n for a, n in zip(accepted, stats.accepted_per_position)]
                proposed = [a + n for a, n in zip(proposed, stats.proposed_per_position)]
                tokens += len(result.token_ids)
                steps += stats.forward_passes - 1
    finally:
        model.train(was_training)
    per_step = tokens_per_decode_step(tokens, prompts.shape[0], steps)
    return {"accept": [round(a, 4) for a in autotune.acceptance_from_stats(accepted, proposed)],
            "tokens_per_step": None if per_step is None else round(per_step, 4)}

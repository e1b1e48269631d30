"""Self-distillation (train/distill.py, `tidar train --self-distill`): rollouts are the model's
own greedy continuations (transformers' greedy is the oracle) of training-split prompts, their
loss covers the continuation only, a mixed batch's loss is the mean of its rows' losses, the
acceptance estimate is what the runtime's verification accepts, a resumed run reads its cached
rollouts, and a few steps raise the acceptance the runtime measures."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.checkpoint import load_model
from tidar.runtime.generate import DecodeEngine, Request
from tidar.train import distill
from tidar.train.distill import accepted_drafts, greedy_rollouts, rollout_losses
from tidar.train.objective import full_mask_inputs, full_mask_loss
from tidar.train.trainer import Trainer, TrainConfig

from test_train import SMALL, corpus

DISTILL = dict(SMALL, self_distill=0.5, rollout_count=8, rollout_prompt_len=8, rollout_eval=4, rollout_batch=4)


def test_rollouts_are_transformers_greedy(tiny_checkpoints):
    path = tiny_checkpoints["qwen2"]
    model = load_model(path, dtype="float32")
    prompts = torch.randint(3, model.config.vocab_size, (3, 7))
    rollouts = greedy_rollouts(model, prompts, 12, batch_size=2)  # two generation batches
    assert rollouts.tokens.shape == (3, 19) and rollouts.prompt_len == 7
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample, config.max_new_tokens = None, 1, False, 12
    for prompt, row in zip(prompts, rollouts.tokens):
        ids = prompt[None]
        reference = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert row.tolist() == reference[0].tolist()


def test_rollout_loss_covers_the_continuation_only():
    """S = 4, prompt 2, vocab 3: every cross-entropy written out; prompt positions carry no loss."""
    tokens = torch.tensor([[0, 2, 1, 2]])
    logits = torch.randn(1, 8, 3)

    def ce(row: torch.Tensor, label: int) -> float:
        return -(row[label] - torch.logsumexp(row, 0)).item()

    ar = (ce(logits[0, 1], 1) + ce(logits[0, 2], 2)) / 2  # x_1 predicts x_2, x_2 predicts x_3
    diff = (ce(logits[0, 6], 1) + ce(logits[0, 7], 2)) / 2  # masks 2 and 3 predict x_2 and x_3
    losses = rollout_losses(logits, tokens, prompt_len=2, alpha=1.0, ar_weight=0.25)
    assert losses.ar.item() == pytest.approx(ar, rel=1e-6)
    assert losses.diffusion.item() == pytest.approx(diff, rel=1e-6)
    assert losses.total.item() == pytest.approx((0.25 * ar + diff) / 2.0, rel=1e-6)


def test_draft_decay_weighs_each_mask_by_its_offset_in_the_block():
    """S = 8, b = 4, prompt 2, decay 0.5: the masks at positions 2..7 sit at block offsets
    2, 3, 0, 1, 2, 3 and weigh 0.5, 0.25, 0.5, 1, 0.5, 0.25 (decay^|j-1|); the reported
    diffusion loss stays the plain mean, and decay 1 is the plain mean."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 5, (2, 8))
    logits = torch.randn(2, 16, 5)
    ce = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 5), tokens[:, 2:].reshape(-1),
                                           reduction="none").view(2, 6)
    weights = torch.tensor([0.5, 0.25, 0.5, 1.0, 0.5, 0.25])
    weighted = float((ce * weights).sum() / (weights.sum() * 2))
    losses = rollout_losses(logits, tokens, 2, alpha=1.0, ar_weight=0.0, block_size=4, draft_decay=0.5)
    assert losses.total.item() == pytest.approx(weighted / 2.0, rel=1e-6)
    assert losses.diffusion.item() == pytest.approx(float(ce.mean()), rel=1e-6)
    plain = rollout_losses(logits, tokens, 2, alpha=1.0, ar_weight=0.0, block_size=4, draft_decay=1.0)
    assert plain.total.item() == pytest.approx(float(ce.mean()) / 2.0, rel=1e-6)
    assert weighted != pytest.approx(float(ce.mean()), rel=1e-3)


def test_miss_weight_weighs_the_blocks_that_missed_their_start():
    """S = 8, b = 4, prompt 2: block 0 (positions 0..3) has mask 0 right, block 1 (4..7) has it
    wrong, so with miss weight 3 the masks at 4..7 weigh 3 and those at 2, 3 weigh 1."""
    torch.manual_seed(1)
    tokens = torch.tensor([[1, 2, 3, 4, 0, 1, 2, 3]])
    logits = torch.randn(1, 16, 5)
    logits[0, 8] = torch.nn.functional.one_hot(torch.tensor(1), 5) * 10.0  # mask 0 of block 0 says x_0
    logits[0, 12] = torch.nn.functional.one_hot(torch.tensor(4), 5) * 10.0  # block 1 says 4, x_4 is 0
    missed = distill.missed_block_starts(logits, tokens, 4)
    assert missed.tolist() == [[False] * 4 + [True] * 4]
    ce = torch.nn.functional.cross_entropy(logits[0, 10:], tokens[0, 2:], reduction="none")
    weights = torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    losses = rollout_losses(logits, tokens, 2, alpha=1.0, ar_weight=0.0, block_size=4, miss_weight=3.0)
    assert losses.total.item() == pytest.approx(float((ce * weights).sum() / weights.sum()) / 2.0, rel=1e-6)
    assert losses.diffusion.item() == pytest.approx(float(ce.mean()), rel=1e-6)


def test_the_runtime_acceptance_is_what_bench_counts(tiny_checkpoints):
    """`runtime_acceptance` (batched) gives the per-position acceptance and tokens per step that
    `tidar bench`'s `run_runtime` (one request at a time) reports at (b, b)."""
    from tidar.runtime import bench

    model = load_model(tiny_checkpoints["qwen2"], dtype="float32").eval()
    prompts = torch.randint(3, model.config.vocab_size, (3, 7))
    b = model.config.block_size
    mine = distill.runtime_acceptance(model, prompts, 12, batch_size=2)
    theirs = bench.run_runtime(TorchBackend(model), None, b, prompts.tolist(), 12, 1, draft_blocks=b)
    assert mine["accept"] == [round(a, 4) for a in theirs["acceptance_per_position"]]
    assert mine["tokens_per_step"] == round(theirs["tokens_per_step"], 4)


@pytest.mark.parametrize("decay", [0.0, -0.5, float("nan"), float("inf")])
def test_a_bad_draft_decay_is_refused_by_name_before_anything_is_written(tmp_path, decay):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"rollout_draft_decay must be a positive number.*got {decay}"):
        Trainer(TrainConfig(files=corpus(tmp_path), out=str(out), steps=2, rollout_draft_decay=decay, **DISTILL))
    assert not out.exists()


def test_a_bad_miss_weight_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="rollout_miss_weight must be a positive number.*got 0.0"):
        Trainer(TrainConfig(files=corpus(tmp_path), out=str(tmp_path / "out"), steps=2, rollout_miss_weight=0.0,
                            **DISTILL))
    assert not (tmp_path / "out").exists()


def test_mixed_batch_is_the_mean_of_its_rows_and_prompts_come_from_the_training_split(tmp_path):
    trainer = Trainer(TrainConfig(files=corpus(tmp_path), out=str(tmp_path / "out"), steps=4, **DISTILL))
    real, rollouts = trainer.batch(0)
    assert real.shape == (2, 16) and rollouts.shape == (2, 16)
    losses = trainer.losses(real, rollouts)
    with torch.no_grad():  # separate forwards: rows are independent
        data = full_mask_loss(trainer.model, real, 1.0)
        inputs, layout = full_mask_inputs(rollouts, 2, 4)
        mine = rollout_losses(trainer.model(inputs, layout), rollouts, 8, 1.0, 0.0)
    torch.testing.assert_close(losses["total"], (data.total + mine.total) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["rollout_diffusion"], mine.diffusion, rtol=1e-5, atol=1e-6)

    def windows(stream: torch.Tensor) -> set[tuple[int, ...]]:
        return {tuple(w) for w in stream.long().unfold(0, 8, 1).tolist()}

    pool = trainer._pool("train").tokens
    train_windows, heldout_windows = windows(trainer.train_batches.stream), windows(trainer.heldout_stream)
    assert all(tuple(row[:8].tolist()) in train_windows for row in pool)
    assert all(tuple(row[:8].tolist()) in heldout_windows for row in trainer._pool("heldout").tokens)


def test_resume_reads_the_cached_rollouts_and_continues_exactly(tmp_path, monkeypatch):
    files = corpus(tmp_path)
    straight = Trainer(TrainConfig(files=files, out=str(tmp_path / "a"), steps=6, **DISTILL))
    straight.run(progress=False)
    halted = Trainer(TrainConfig(files=files, out=str(tmp_path / "b"), steps=6, **DISTILL))
    halted.run(progress=False, until=4)

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run generated rollouts again")

    monkeypatch.setattr(distill, "greedy_rollouts", refuse)
    monkeypatch.setattr("tidar.train.trainer.greedy_rollouts", refuse)
    resumed = Trainer(TrainConfig(files=files, out=str(tmp_path / "b"), steps=6, **DISTILL), resume=True)
    resumed.run(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "b" / "rollouts").iterdir()) == ["heldout-000.pt", "train-000.pt"]


def test_distillation_raises_acceptance_and_the_estimate_is_the_runtimes(tmp_path):
    """Pure self-distillation on a small pool: the runtime's T/NFE on the pool's prompts rises,
    and on fresh greedy rollouts the estimate's first block equals the drafts the runtime's
    first verification step accepts."""
    config = dict(DISTILL, self_distill=1.0, steps=30, lr=3e-2, warmup_steps=2, eval_every=30, save_every=30)
    trainer = Trainer(TrainConfig(files=corpus(tmp_path), out=str(tmp_path / "out"), **config))
    prompts = trainer._pool("train").tokens[:, :8]

    def tokens_per_forward() -> float:
        trainer.model.eval()
        results = DecodeEngine(TorchBackend(trainer.model), draft_len=4).generate(
            [Request(p.tolist(), 8, eos_ids=()) for p in prompts])
        trainer.model.train()
        return sum(len(r.token_ids) for r in results) / sum(r.stats.forward_passes for r in results)

    before = tokens_per_forward()
    trainer.run(progress=False)
    after = tokens_per_forward()
    assert after > before + 0.5, (before, after)

    fresh = greedy_rollouts(trainer.model, prompts, 8, batch_size=8)
    estimate = accepted_drafts(trainer.model, fresh.tokens, 8)[:, 0]
    trainer.model.eval()
    engine = DecodeEngine(TorchBackend(trainer.model), draft_len=4)
    engine.add([Request(p.tolist(), 8, eos_ids=()) for p in prompts])
    first_step = [delta.step_stats.accepted_tokens for delta in engine.step()]
    assert estimate.tolist() == first_step
    assert sum(first_step) > 0


def test_heldout_evaluation_of_a_saved_checkpoint_is_the_trainers(tmp_path):
    from tidar.train.heldout import heldout_losses

    settings = dict(DISTILL, steps=2, eval_every=2, save_every=2, save_dtype="float32")
    trainer = Trainer(TrainConfig(files=corpus(tmp_path), out=str(tmp_path / "out"), **settings))
    final = trainer.run(progress=False)[-1]
    assert final["kind"] == "eval" and final["step"] == 2
    result = heldout_losses(tmp_path / "out", batches=2, batch_size=4, rollouts=4, prompt_len=8)
    assert result["ar"] == pytest.approx(final["ar"], rel=1e-5)
    assert result["diffusion"] == pytest.approx(final["diffusion"], rel=1e-5)
    assert result["drafts"] == final["drafts"]
    assert result["drafts_runtime"] == final["drafts_runtime"]
    after = result["drafts"]["after_miss"]
    assert after["blocks"] <= result["drafts"]["blocks"] and len(after["accept"]) == 3

"""The full-mask objective and the trainer: the loss equals a hand computation on a tiny case,
a few steps lower it, a resumed run continues bit for bit, AR checkpoints convert to TiDAR,
and the data split never puts a file on both sides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tidar.runtime.checkpoint import load_model
from tidar.runtime.layout import Layout
from tidar.train.checkpoint import stdlib_files, tiny_config
from tidar.train.data import Batches, split_files
from tidar.train.objective import full_mask_inputs, losses_from_logits
from tidar.train.trainer import Trainer, TrainConfig, learning_rate

SMALL = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, block_size=4, seq_len=16, batch_size=4, warmup_steps=2, eval_every=3,
             eval_batches=2, save_every=3, log_every=1, heldout_percent=25.0, max_position_embeddings=128, lr=1e-2)


def corpus(tmp_path: Path, count: int = 12) -> list[str]:
    """A small corpus copied from the standard library (the trainer's real input type)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for source in stdlib_files(count):
        (folder / f"{source.parent.name}_{source.name}").write_text(source.read_text()[:20000])
    return [str(folder / "*.py")]


def test_loss_matches_a_hand_computation():
    """S = 4, b = 2, vocab 3, alpha = 0.5: every cross-entropy written out term by term."""
    tokens = torch.tensor([[0, 2, 1, 2]])
    logits = torch.randn(1, 8, 3)
    alpha = 0.5

    def ce(row: torch.Tensor, label: int) -> float:
        return -(row[label] - torch.logsumexp(row, 0)).item()

    ar = sum(ce(logits[0, i], int(tokens[0, i + 1])) for i in range(3)) / 3  # output at x_i predicts x_{i+1}
    diff = sum(ce(logits[0, 4 + i], int(tokens[0, i])) for i in range(4)) / 4  # mask i predicts x_i
    losses = losses_from_logits(logits, tokens, alpha)
    assert losses.ar.item() == pytest.approx(ar, rel=1e-6)
    assert losses.diffusion.item() == pytest.approx(diff, rel=1e-6)
    assert losses.total.item() == pytest.approx((alpha * ar + diff) / (1 + alpha), rel=1e-6)


def test_inputs_double_the_sequence_with_masks_at_the_clean_positions():
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    inputs, layout = full_mask_inputs(tokens, mask_token_id=2, block_size=3)
    assert inputs.tolist() == [[5, 6, 7, 8, 9, 10, 2, 2, 2, 2, 2, 2]]
    assert layout == Layout.training(6, 3)
    assert layout.position_ids(torch.tensor([0])).tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]


def test_clean_half_is_independent_of_the_masks():
    """The AR logits of the doubled input equal a plain causal forward (clean tokens never see masks)."""
    from tidar.runtime.model import TiDARModel

    torch.manual_seed(0)
    model = TiDARModel(tiny_config("qwen3", 50, block_size=4)).eval()
    tokens = torch.randint(3, 50, (2, 8))
    inputs, layout = full_mask_inputs(tokens, model.config.mask_token_id, 4)
    with torch.no_grad():
        doubled = model(inputs, layout)[:, :8]
        plain = model(tokens, Layout.autoregressive(8))
    torch.testing.assert_close(doubled, plain, rtol=0, atol=1e-5)


def test_learning_rate_schedule():
    config = TrainConfig(files=[], out="", steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 55) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(config, 100) == pytest.approx(1e-4)


def test_split_is_by_file_and_stable(tmp_path):
    files = [tmp_path / f"f{i}.py" for i in range(200)]
    train, heldout = split_files(files, 10.0)
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == 200
    assert 5 <= len(heldout) <= 40
    assert set(split_files(list(reversed(files)), 10.0)[1]) == set(heldout)
    batches = Batches(torch.arange(1000, dtype=torch.int32), seq_len=16, batch_size=3, seed=1)
    assert torch.equal(batches.at_step(7), batches.at_step(7)) and not torch.equal(batches.at_step(7),
                                                                                  batches.at_step(8))


def test_training_lowers_the_loss_and_resume_is_exact(tmp_path):
    files = corpus(tmp_path)
    straight = Trainer(TrainConfig(files=files, out=str(tmp_path / "a"), steps=12, **SMALL))
    history = straight.run(progress=False)
    evals = [h for h in history if h["kind"] == "eval"]
    first = [h for h in history if h["kind"] == "train"][0]
    assert evals[-1]["ar"] < first["ar"] - 0.3 and evals[-1]["diffusion"] < first["diffusion"] - 0.3
    out = tmp_path / "a"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss_curve.png", "history.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["tidar"] == {"mask_token_id": 2, "block_size": 4}
    assert load_model(out).dtype == torch.bfloat16  # saved in the configured dtype, loads in the runtime

    halted = Trainer(TrainConfig(files=files, out=str(tmp_path / "b"), steps=12, **SMALL))
    halted.run(progress=False, until=5)  # stop between saves, as an interrupted run would
    resumed = Trainer(TrainConfig(files=files, out=str(tmp_path / "b"), steps=12, **SMALL), resume=True)
    assert resumed.step == 5
    resumed.run(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(TrainConfig(files=files, out=str(tmp_path / "b"), steps=12, **SMALL))


def test_converting_an_ar_checkpoint(tmp_path, tiny_checkpoints):
    """A plain AR checkpoint (no tidar block, no [MASK] token) becomes a TiDAR one by continued training;
    before any step its AR logits are the source model's."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "ar"
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    hf.save_pretrained(source)
    raw = json.loads((source / "config.json").read_text())
    del raw["tidar"]  # a plain AR checkpoint
    (source / "config.json").write_text(json.dumps(raw))
    text = (tiny_checkpoints["llama"] / "tokenizer.json").read_text()
    (source / "tokenizer.json").write_text(text.replace("[MASK]", "<|reserved|>"))  # no [MASK] token at all
    config = TrainConfig(files=corpus(tmp_path, 6), out=str(tmp_path / "tidar"), init_from=str(source),
                         steps=2, **{k: v for k, v in SMALL.items() if k in ("block_size", "seq_len", "batch_size",
                                                                              "eval_batches", "heldout_percent")})
    trainer = Trainer(config)
    vocab = raw["vocab_size"]
    assert trainer.model.config.vocab_size == vocab + 1 and trainer.model.config.block_size == 4
    assert trainer.model.config.mask_token_id == vocab  # [MASK] was added as a new token
    ids = torch.randint(3, vocab, (1, 12))
    with torch.no_grad():
        ours = trainer.model(ids, Layout.autoregressive(12))[..., :vocab]
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    trainer.run(progress=False)
    converted = load_model(tmp_path / "tidar")
    assert converted.config.mask_token_id == trainer.model.config.mask_token_id


def test_mask_token_must_exist_when_named(tmp_path, tiny_checkpoints):
    config = TrainConfig(files=corpus(tmp_path, 4), out=str(tmp_path / "x"), init_from=str(tiny_checkpoints["qwen2"]),
                         mask_token="<|no such token|>", seq_len=16, block_size=4, heldout_percent=25.0)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Trainer(config)

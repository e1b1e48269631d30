"""Data-parallel training (train/distributed.py): `tidar train` under torchrun with 2 CPU
processes (gloo) logs the same losses and ends with the same weights as one process at the
same global batch, with self-distillation rollouts in the batch; the ranks' shares partition it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tidar.runtime.checkpoint import load_state_dict
from tidar.runtime.config import TiDARConfig
from tidar.runtime.model import TiDARModel
from tidar.train.distributed import Group
from tidar.train.trainer import Trainer, TrainConfig

from test_train import SMALL, corpus

SETTINGS = dict(SMALL, steps=4, eval_every=4, save_every=4, self_distill=0.5, rollout_count=8,
                rollout_prompt_len=8, rollout_eval=4, rollout_batch=4, threads=1, save_dtype="float32")


def flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in ("--" + key.replace("_", "-"), str(value))]


def test_ranks_share_the_batch_without_overlap():
    rows = torch.arange(12).reshape(6, 2)
    shares = [Group(rank, 3).share(rows, "rows") for rank in range(3)]
    assert torch.equal(torch.cat(shares), rows)


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    files = corpus(tmp_path)
    single = Trainer(TrainConfig(files=files, out=str(tmp_path / "one"), **SETTINGS))
    single.run(progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tidar.cli", "train", "--files", *files, "-o", str(tmp_path / "two"), *flags(SETTINGS)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    def train_losses(history: list[dict]) -> list[tuple]:
        return [(h["step"], h["loss"], h["ar"], h["diffusion"], h["rollout_diffusion"])
                for h in history if h["kind"] == "train"]

    two = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    ours, theirs = train_losses(two), train_losses(single.history)
    assert [t[0] for t in ours] == [1, 2, 3, 4] == [t[0] for t in theirs]
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    evals = [(h["ar"], h["diffusion"]) for h in two if h["kind"] == "eval"]
    torch.testing.assert_close(torch.tensor(evals), torch.tensor([(h["ar"], h["diffusion"])
                                                                  for h in single.history if h["kind"] == "eval"]),
                               rtol=1e-5, atol=1e-5)
    model = TiDARModel(TiDARConfig.from_file(tmp_path / "two"))
    weights = load_state_dict(tmp_path / "two", model)
    for name, value in single.model.state_dict().items():
        if name in weights:
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)

"""A small, resumable trainer for the full-mask TiDAR objective on plain-text files.

    OUT/                      a loadable TiDAR checkpoint at every save (config.json,
                              model.safetensors, tokenizer.json, tokenizer_config.json)
    OUT/train_config.json     the run's settings
    OUT/train_state.pt        weights in fp32, optimizer state and step, for --resume
    OUT/history.jsonl         one line per logged step and per evaluation
    OUT/loss_curve.png        train loss and held-out AR / diffusion losses
    OUT/rollouts/             self-distillation rollouts, one file per generation (with --self-distill)
    OUT/steps/step-NNNNNN/    loadable copies of the checkpoint every `keep_every` steps

With `self_distill` = f > 0, a share f of every batch's rows are the model's own greedy
rollouts (train/distill.py): their continuations train the diffusion half, with AR weight
`rollout_ar_weight` (default 0); the other rows are real data with the AR and diffusion losses.
Every evaluation then also estimates draft acceptance on rollouts of held-out prompts.

AdamW, linear warm-up then cosine decay to `min_lr`, gradient clipping. A new model gets a
byte-level BPE tokenizer trained on the training split; `init_from` instead converts an
existing AR checkpoint (the paper's recipe: continued pre-training), reusing one of its
tokens as [MASK] or adding one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tidar.runtime.checkpoint import load_state_dict
from tidar.runtime.config import TiDARConfig
from tidar.runtime.model import TiDARModel

from .checkpoint import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, save_checkpoint, save_tokenizer, train_tokenizer
from .distributed import join
from .data import Batches, expand_globs, split_files, token_stream
from .distill import (Rollouts, cached, draft_acceptance, greedy_rollouts, prompt_windows, rollout_losses,
                      runtime_acceptance, spaced_windows)
from .objective import full_mask_inputs, full_mask_loss, losses_from_logits


@dataclass
class TrainConfig:
    """Settings of one training run (written to OUT/train_config.json)."""

    files: list[str]
    """Glob patterns of the plain-text training corpus."""
    out: str
    """Output folder (a TiDAR checkpoint plus training state)."""
    init_from: str | None = None
    """An AR (or TiDAR) checkpoint to continue training from; None trains from scratch."""
    mask_token: str | None = None
    """With init_from: an existing token to reuse as [MASK] (e.g. '<|fim_pad|>'); None adds '[MASK]'."""
    family: str = "qwen2"
    """Backbone of a new model."""
    vocab_size: int = 4096
    """BPE vocabulary of a new model (special tokens included)."""
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    block_size: int = 16
    """Draft block size b of the objective."""
    seq_len: int = 256
    """Clean tokens per sequence S (the model sees 2S); a multiple of block_size."""
    batch_size: int = 16
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    alpha: float = 1.0
    """Weight of the AR loss against the diffusion loss."""
    heldout_percent: float = 5.0
    """Share of files held out for evaluation."""
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    save_dtype: str = "bfloat16"
    """Dtype of the saved checkpoint's weights (training runs in fp32)."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    self_distill: float = 0.0
    """Share of each batch's rows that are self-distillation rollouts (0: off; docs/design.md §2)."""
    rollout_count: int = 1024
    """Rollouts per generation of the pool (training-split prompts)."""
    rollout_prompt_len: int = 96
    """Data tokens of a rollout; the model continues it to seq_len tokens."""
    rollout_ar_weight: float = 0.0
    """AR loss weight on rollout continuations (real rows have alpha)."""
    rollout_draft_decay: float = 1.0
    """Diffusion loss of rollout rows: mask j of a block weighs decay^|j-1| (1: all alike), so the
    early drafts, which decide acceptance, get most of the signal (`distill.draft_weights`)."""
    rollout_miss_weight: float = 1.0
    """Diffusion loss of rollout rows: blocks whose mask 0 misses the block's first token weigh
    this much more; decode steps start where a draft just missed, so those are the blocks the
    runtime drafts from (`distill.missed_block_starts`, docs/design.md §2)."""
    rollout_refresh: int = 0
    """Regenerate the rollouts with the current model every this many steps (0: never)."""
    rollout_batch: int = 32
    """Rows generated together."""
    rollout_eval: int = 32
    """Rollouts of held-out prompts for the acceptance estimate."""
    keep_every: int = 0
    """Also keep a loadable copy of the checkpoint in OUT/steps/ every this many steps (0: never)."""


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def init_weights(model: TiDARModel, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), output projections scaled by 1/sqrt(2 * layers), norms 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def new_model(config: TrainConfig, tokenizer: Tokenizer) -> TiDARModel:
    model_config = TiDARConfig(
        model_type=config.family, vocab_size=tokenizer.get_vocab_size(), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=1e-6, rope_theta=config.rope_theta,
        mask_token_id=tokenizer.token_to_id(MASK_TOKEN), block_size=config.block_size,
        tie_word_embeddings=config.tie_word_embeddings, eos_token_ids=(tokenizer.token_to_id(EOS_TOKEN),),
        pad_token_id=tokenizer.token_to_id(PAD_TOKEN), torch_dtype=config.save_dtype)
    model_config.validate()
    model = TiDARModel(model_config, attention="sdpa")
    init_weights(model, config.seed)
    return model


def convert_checkpoint(config: TrainConfig) -> tuple[TiDARModel, Tokenizer]:
    """Load an AR checkpoint as a TiDAR model: pick or add the [MASK] token, add the tidar block."""
    source = Path(config.init_from)
    raw = json.loads((source / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    if config.mask_token is not None:
        mask_id = tokenizer.token_to_id(config.mask_token)
        if mask_id is None:
            raise ValueError(f"{source}/tokenizer.json: mask token {config.mask_token!r} is not in the vocabulary")
    else:
        mask_id = tokenizer.token_to_id(MASK_TOKEN)
        if mask_id is None:
            tokenizer.add_special_tokens([MASK_TOKEN])
            mask_id = tokenizer.token_to_id(MASK_TOKEN)
    source_vocab = raw["vocab_size"]
    raw["vocab_size"] = max(source_vocab, mask_id + 1)
    raw["tidar"] = {"mask_token_id": mask_id, "block_size": config.block_size}
    model_config = TiDARConfig.from_dict(raw, source=str(source / "config.json"))
    source_model = TiDARModel(dataclasses.replace(model_config, vocab_size=source_vocab))
    source_model.load_state_dict(load_state_dict(source, source_model), strict=False)
    model = TiDARModel(model_config, attention="sdpa")
    state = source_model.state_dict()
    if raw["vocab_size"] > source_vocab:  # new [MASK] row(s): the mean embedding, a neutral start
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            old = state[name]
            extra = old.mean(0, keepdim=True).expand(raw["vocab_size"] - source_vocab, -1)
            state[name] = torch.cat([old, extra])
    model.load_state_dict(state, strict=False)
    return model.float(), tokenizer


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["kind"] == "train"]
    evals = [h for h in history if h["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss (total)", alpha=0.6)
    if evals:
        ax.plot([h["step"] for h in evals], [h["ar"] for h in evals], "o-", label="held-out AR loss")
        ax.plot([h["step"] for h in evals], [h["diffusion"] for h in evals], "s-", label="held-out diffusion loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def evaluate(model: TiDARModel, batches: list[torch.Tensor], alpha: float) -> dict[str, float]:
    model.eval()
    ar = diffusion = 0.0
    for batch in batches:
        losses = full_mask_loss(model, batch.to(model.device), alpha)
        ar += float(losses.ar)
        diffusion += float(losses.diffusion)
    model.train()
    return {"ar": ar / len(batches), "diffusion": diffusion / len(batches)}


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        if config.seq_len % config.block_size:
            raise ValueError(f"seq_len {config.seq_len} must be a multiple of block_size {config.block_size}")
        if not 0.0 <= config.self_distill <= 1.0:
            raise ValueError(f"self_distill must be a share of the batch in [0, 1], got {config.self_distill}")
        self.rollout_rows = round(config.batch_size * config.self_distill)
        if config.self_distill and not self.rollout_rows:
            raise ValueError(f"self_distill {config.self_distill} of batch_size {config.batch_size} is no row")
        if not (0.0 < config.rollout_draft_decay < float("inf")):
            raise ValueError(f"rollout_draft_decay must be a positive number (mask j of a block weighs "
                             f"decay^|j-1|), got {config.rollout_draft_decay}")
        if not (0.0 < config.rollout_miss_weight < float("inf")):
            raise ValueError(f"rollout_miss_weight must be a positive number (the weight of blocks that "
                             f"missed their start), got {config.rollout_miss_weight}")
        if self.rollout_rows and not 0 < config.rollout_prompt_len < config.seq_len:
            raise ValueError(f"rollout_prompt_len {config.rollout_prompt_len} must be in (0, seq_len "
                             f"{config.seq_len}): the model continues the prompt to seq_len tokens")
        self.real_rows = config.batch_size - self.rollout_rows
        self.group = join()  # data-parallel under torchrun (train/distributed.py), else one process
        if self.real_rows % self.group.world or self.rollout_rows % self.group.world:
            raise ValueError(f"batch_size {config.batch_size} ({self.real_rows} real rows, {self.rollout_rows} "
                             f"rollout rows) does not split evenly over {self.group.world} ranks")
        self.device = self.group.device()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.out = Path(config.out)
        state_file = self.out / "train_state.pt"
        if resume and not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: nothing to resume")
        if not resume and state_file.exists():
            raise FileExistsError(f"{self.out}: holds a training run; pass --resume to continue it")
        self.out.mkdir(parents=True, exist_ok=True)

        train_files, heldout_files = split_files(expand_globs(config.files), config.heldout_percent)
        if resume:
            self.tokenizer = Tokenizer.from_file(str(self.out / "tokenizer.json"))
            self.model = TiDARModel(TiDARConfig.from_file(self.out), attention="sdpa")
        elif config.init_from:
            self.model, self.tokenizer = convert_checkpoint(config)
        else:
            self.tokenizer = train_tokenizer(train_files, config.vocab_size)
            self.model = new_model(config, self.tokenizer)
        eos = self.model.config.eos_token_ids[0] if self.model.config.eos_token_ids else 0
        self.train_batches = Batches(token_stream(train_files, self.tokenizer, eos), config.seq_len,
                                     max(self.real_rows, 1), config.seed)
        heldout = Batches(token_stream(heldout_files, self.tokenizer, eos), config.seq_len, config.batch_size,
                          config.seed)
        self.eval_batches = heldout.fixed(config.eval_batches)
        self.heldout_stream = heldout.stream
        self._pools: dict[str, tuple[int, Rollouts]] = {}
        self.split = {"train_files": len(train_files), "heldout_files": len(heldout_files),
                      "train_tokens": int(self.train_batches.stream.numel()),
                      "heldout_tokens": int(heldout.stream.numel())}
        self.model.to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
        self.step = 0
        self.history: list[dict] = []
        if resume:
            state = torch.load(state_file, weights_only=True, map_location=self.device)
            self.model.load_state_dict(state["model"])
            if self.model.config.tie_word_embeddings:
                self.model.lm_head.weight = self.model.model.embed_tokens.weight
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.history = [json.loads(line) for line in (self.out / "history.jsonl").read_text().splitlines()]
            self.history = [h for h in self.history if h["step"] <= self.step]  # logged after the last save
            saved = json.loads((self.out / "train_config.json").read_text())
            changed = {k: v for k, v in dataclasses.asdict(config).items() if saved.get(k) != v}
            self.history.append({"kind": "resume", "step": self.step, "changed": changed})
        elif self.group.main:
            (self.out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        self.forward_model = self.model
        if self.group.active:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ self-distillation
    def _generation(self) -> int:
        return self.step // self.config.rollout_refresh if self.config.rollout_refresh else 0

    def _pool(self, split: str) -> Rollouts:
        """This step's rollout pool of `split` ("train" or "heldout"), generated once per
        generation with the model as it is then, or read from OUT/rollouts/. Under DDP rank 0
        generates the training pool and the other ranks read it (only rank 0 evaluates)."""
        config, generation = self.config, self._generation()
        if split in self._pools and self._pools[split][0] == generation:
            return self._pools[split][1]
        if split == "train":
            prompts = prompt_windows(self.train_batches.stream, config.rollout_count, config.rollout_prompt_len,
                                     config.seed * 1_000_003 + generation)
        else:
            prompts = spaced_windows(self.heldout_stream, config.rollout_eval, config.rollout_prompt_len)
        path = self.out / "rollouts" / f"{split}-{generation:03d}.pt"
        started = time.perf_counter()
        if split == "train" and not self.group.main:
            self.group.barrier()  # rank 0 writes the pool
        made = not path.is_file()
        pool = cached(path, lambda: greedy_rollouts(self.model, prompts, config.seq_len - config.rollout_prompt_len,
                                                    config.rollout_batch))
        if split == "train" and self.group.main:
            self.group.barrier()
        if made:
            self.history.append({"kind": "rollouts", "step": self.step, "split": split, "generation": generation,
                                 "rows": int(pool.tokens.shape[0]),
                                 "seconds": round(time.perf_counter() - started, 2)})
        self._pools[split] = (generation, pool)
        return pool

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's (real rows, rollout rows or None) of `step`, on its device: its share of the
        global batch, a pure function of seed, step and the pool."""
        real = self.group.share(self.train_batches.at_step(step)[: self.real_rows], "real rows").to(self.device)
        if not self.rollout_rows:
            return real, None
        pool = self._pool("train").tokens
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step + 7_919)
        rows = pool[torch.randint(0, pool.shape[0], (self.rollout_rows,), generator=generator)]
        return real, self.group.share(rows, "rollout rows").to(self.device)

    def losses(self, real: torch.Tensor, rollouts: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One forward over real and rollout rows; total = mean over rows of each row's loss."""
        config, model_config = self.config, self.model.config
        tokens = real if rollouts is None else torch.cat([real, rollouts])
        inputs, layout = full_mask_inputs(tokens, model_config.mask_token_id, model_config.block_size)
        logits = self.forward_model(inputs, layout)
        if rollouts is None:
            losses = losses_from_logits(logits, real, config.alpha)
            return {"total": losses.total, "ar": losses.ar, "diffusion": losses.diffusion}
        rows = real.shape[0]
        mine = rollout_losses(logits[rows:], rollouts, config.rollout_prompt_len, config.alpha,
                              config.rollout_ar_weight, model_config.block_size, config.rollout_draft_decay,
                              config.rollout_miss_weight)
        result = {"rollout_ar": mine.ar, "rollout_diffusion": mine.diffusion}
        if rows:
            data = losses_from_logits(logits[:rows], real, config.alpha)
            total = (rows * data.total + rollouts.shape[0] * mine.total) / tokens.shape[0]
            result.update(ar=data.ar, diffusion=data.diffusion)
        else:
            total = mine.total
        return {"total": total, **result}

    def evaluate(self) -> dict:
        result = evaluate(self.model, self.eval_batches, self.config.alpha)
        if self.rollout_rows:
            pool = self._pool("heldout")
            result["drafts"] = draft_acceptance(self.model, pool, self.config.batch_size)
            result["drafts_runtime"] = runtime_acceptance(self.model, pool.tokens[:, : pool.prompt_len],
                                                          pool.tokens.shape[1] - pool.prompt_len,
                                                          self.config.rollout_batch)
        return result

    def save(self) -> None:
        """Write the loadable checkpoint and the resumable state (each file replaced atomically);
        rank 0 only."""
        config = self.config
        if not self.group.main:
            return
        # the objective trains blocks of block_size masks only (train/objective.py): that is the trained size
        saved = TiDARModel(dataclasses.replace(self.model.config, torch_dtype=config.save_dtype,
                                               trained_block_sizes=(self.model.config.block_size,)))
        saved.load_state_dict({k: v.cpu() for k, v in self.model.state_dict().items()})
        saved.to(getattr(torch, config.save_dtype))
        save_checkpoint(saved, self.out)
        source_config = Path(config.init_from) / "tokenizer_config.json" if config.init_from else None
        save_tokenizer(self.tokenizer, self.out, self.model.config.max_position_embeddings,
                       json.loads(source_config.read_text()) if source_config and source_config.is_file() else None)
        tmp = self.out / "train_state.pt.tmp"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step},
                   tmp)
        tmp.replace(self.out / "train_state.pt")
        (self.out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))
        _plot(self.history, self.out / "loss_curve.png")
        if config.keep_every and self.step % config.keep_every == 0:
            import shutil

            keep = self.out / "steps" / f"step-{self.step:06d}"
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "train_config.json"):
                shutil.copy2(self.out / name, keep / name)

    def run(self, progress: bool = True, until: int | None = None) -> list[dict]:
        """Train to `config.steps` (or stop after step `until`, saving, as an interrupted run would)."""
        from tqdm import tqdm

        config, model = self.config, self.model
        model.train()
        bar = tqdm(total=config.steps, initial=self.step, disable=not progress or not self.group.main, unit="step",
                   dynamic_ncols=True)
        started = time.perf_counter()
        last = min(config.steps, until) if until is not None else config.steps
        if self.step == 0 and (config.init_from or self.rollout_rows) and self.step < last:
            self._log_eval(bar)  # the starting point of a continued run
        while self.step < last:
            lr = learning_rate(config, self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            losses = self.losses(*self.batch(self.step))
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            self.optimizer.step()
            self.step += 1
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == config.steps:
                logged = {("loss" if k == "total" else k): v for k, v in self.group.mean(losses).items()}
                self.history.append({"kind": "train", "step": self.step, **logged, "lr": lr,
                                     "grad_norm": float(grad_norm),
                                     "seconds": round(time.perf_counter() - started, 2)})
                bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{lr:.2e}")
            if self.step % config.eval_every == 0 or self.step == config.steps:
                self._log_eval(bar)
            if self.step % config.save_every == 0 or self.step in (config.steps, last):
                self.save()
        bar.close()
        return self.history

    def _log_eval(self, bar) -> None:
        """Rank 0 evaluates; the others wait."""
        if not self.group.main:
            self.group.barrier()
            return
        result = self.evaluate()
        self.history.append({"kind": "eval", "step": self.step, **result})
        drafts = result.get("drafts")
        bar.write(f"step {self.step}: held-out AR loss {result['ar']:.4f}, diffusion loss {result['diffusion']:.4f}"
                  + (f", draft acceptance {drafts['accept'][:4]} (after a miss {drafts['after_miss']['accept'][:2]}), "
                     f"tokens/step {drafts['tokens_per_step']}; runtime {result['drafts_runtime']['accept'][:4]}, "
                     f"tokens/step {result['drafts_runtime']['tokens_per_step']}" if drafts else ""))
        self.group.barrier()

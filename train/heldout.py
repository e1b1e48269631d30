"""Held-out losses of saved checkpoints, by the trainer's own evaluation (docs/design.md §2).

    python -m tidar.train.heldout MODEL [MODEL ...] [--batches 4] [--batch-size 16] [--json OUT]

Each MODEL is loaded from disk in float32 (its saved weights, e.g. bfloat16, widened) and
evaluated on the fixed held-out batches of its own train_config.json (files, held-out share,
seq_len; stdlib, 5 %, 256 by default): the held-out AR loss (nats per token) is the figure a
continued model must not make worse. With self-distillation settings in train_config.json the
draft-acceptance estimate on held-out rollouts is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer

from tidar.runtime.checkpoint import load_model

from .data import Batches, expand_globs, split_files, token_stream
from .distill import draft_acceptance, greedy_rollouts, runtime_acceptance, spaced_windows
from .trainer import evaluate


def heldout_losses(model_dir: str | Path, batches: int = 4, batch_size: int = 16, rollouts: int = 32,
                   prompt_len: int | None = None) -> dict:
    """{model, ar, diffusion, drafts, drafts_runtime}: drafts estimated on `rollouts` greedy rollouts of held-out
    prompts of `prompt_len` tokens (default: the run's rollout_prompt_len, else 96), drafts_runtime
    what the runtime accepts continuing the same prompts (`runtime_acceptance`)."""
    model_dir = Path(model_dir)
    settings = {"files": ["stdlib"], "heldout_percent": 5.0, "seq_len": 256, "rollout_prompt_len": 96}
    if (model_dir / "train_config.json").is_file():
        settings.update(json.loads((model_dir / "train_config.json").read_text()))
    prompt_len = prompt_len or settings["rollout_prompt_len"]
    model = load_model(model_dir, dtype="float32", attention="sdpa").eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = model.config.eos_token_ids[0] if model.config.eos_token_ids else 0
    _, heldout = split_files(expand_globs(settings["files"]), settings["heldout_percent"])
    stream = token_stream(heldout, tokenizer, eos)
    result = evaluate(model, Batches(stream, settings["seq_len"], batch_size, 0).fixed(batches), 1.0)
    if rollouts:
        pool = greedy_rollouts(model, spaced_windows(stream, rollouts, prompt_len), settings["seq_len"] - prompt_len,
                               batch_size)
        result["drafts"] = draft_acceptance(model, pool, batch_size)
        result["drafts_runtime"] = runtime_acceptance(model, pool.tokens[:, :prompt_len], pool.tokens.shape[1] - prompt_len,
                                                      batch_size)
    return {"model": str(model_dir), **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tidar.train.heldout", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rollouts", type=int, default=32, help="held-out rollouts for the acceptance estimate")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = [heldout_losses(m, args.batches, args.batch_size, args.rollouts) for m in args.models]
    for r in results:
        drafts = r.get("drafts")
        print(f"{r['model']}: held-out AR loss {r['ar']:.4f}, diffusion loss {r['diffusion']:.4f}"
              + (f", estimated tokens/step at b=16 {drafts['tokens_per_step']}, P(d1) {drafts['accept'][0]} "
                 f"(after a missed start {drafts['after_miss']['accept'][0]}); the runtime's P(d1) "
                 f"{r['drafts_runtime']['accept'][0]}, tokens/step {r['drafts_runtime']['tokens_per_step']}"
                 if drafts else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

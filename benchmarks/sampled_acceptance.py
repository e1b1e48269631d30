"""Acceptance under sampling, per draft position, on held-out prompts.

Runs `DecodeEngine` on the bundled model (or CHECKPOINT) in fp32 with sampled requests (one seed
per prompt, or none with --unseeded: docs/design.md §3.5 verifies the two differently) and reports, per temperature and draft length, P(d_1..d_i all accepted) for every
position i, the mean committed tokens per step and T/NFE. It uses only the public engine API,
so the same script measures any commit of the runtime: run it once per checkout, e.g. with an
old commit's package first on PYTHONPATH, to compare mechanisms side by side.

    python benchmarks/sampled_acceptance.py --temperatures 0.8 1.0 --draft-lens 8 16 --out RESULT.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import tidar
from tidar import BUNDLED_MODEL
from tidar.runtime.bench import heldout_prompts
from tidar.runtime import autotune
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.ngram import DRAFTERS
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.sampling import SamplingParams
from tidar.runtime.tokenizer import Tokenizer


def runtime_commit() -> str:
    """The commit of the measured runtime's checkout (no machine path), or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(tidar.__file__),
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(backend, prompts, temperature: float, draft_len: int, max_new_tokens: int, seed: int,
            seeded: bool = True, drafter: str = "tidar") -> dict:
    """Requests carry seeds seed, seed + 1, ... (`seeded`), or none, with torch's generator
    seeded with `seed` (the runtime then draws their noise keys); proposals from `drafter`."""
    engine = DecodeEngine(backend, draft_len=draft_len, drafter=drafter)
    torch.manual_seed(seed)
    requests = [Request(p, max_new_tokens, SamplingParams(temperature=temperature, seed=seed + i if seeded else None),
                        eos_ids=()) for i, p in enumerate(prompts)]
    results = engine.generate(requests)
    drafts = sum(r.stats.drafts for r in results)
    accepted = [sum(col) for col in zip(*(r.stats.accepted_per_position for r in results))]
    tokens = sum(len(r.token_ids) for r in results)
    forwards = sum(r.stats.forward_passes for r in results)
    return {"temperature": temperature, "draft_len": draft_len, "seeded": seeded, "drafter": drafter,
            "steps": drafts, "outputs": [r.token_ids for r in results],
            "acceptance_per_position": [round(p, 4) for p in autotune.acceptance_from_stats(accepted, drafts)],
            "committed_per_step": round(1 + sum(accepted) / max(drafts, 1), 4),
            "tokens_per_forward": round(tokens / forwards, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=str(BUNDLED_MODEL))
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.8, 1.0])
    parser.add_argument("--draft-lens", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unseeded", action="store_true", help="requests without seeds")
    parser.add_argument("--drafters", nargs="+", default=["tidar"], choices=DRAFTERS,
                        help="drafters to measure (docs/design.md §3.9); seeded rows must give the same tokens")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    model = Path(args.checkpoint)
    tokenizer = Tokenizer(model)
    backend = TorchBackend.load(model, dtype="float32")
    prompts = heldout_prompts(model, tokenizer, args.prompts, args.prompt_tokens)
    rows = [measure(backend, prompts, t, b, args.max_new_tokens, args.seed, not args.unseeded, drafter)
            for t in args.temperatures for b in args.draft_lens for drafter in args.drafters]
    for row in rows:  # a seeded row's tokens depend on its seed alone, not on where proposals came from
        first = next(r for r in rows if (r["temperature"], r["draft_len"]) == (row["temperature"], row["draft_len"]))
        row["same_tokens_as_" + first["drafter"]] = row["outputs"] == first["outputs"]
    for row in rows:
        del row["outputs"]
    report = {"benchmark": "sampled_acceptance", "runtime": runtime_commit(),
              "checkpoint": model.name, "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
              "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
              "results": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

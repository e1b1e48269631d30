"""Verify-only steps at batch 1, on and off, side by side (docs/design.md §3.10).

The bundled model (or CHECKPOINT) on torch or ONNX Runtime: the autotuner races the draft shapes
at batch 1 (as `tidar bench` and `tidar generate` do), then the hybrid drafter decodes the held-out
prompts at the chosen shape with and without verify-only steps (`DecodeEngine(shape_policy=...)`,
the race's step seconds as the policy), in interleaved rounds; tokens/s and tokens per forward of
each, and whether their outputs are equal (greedy decoding is lossless, so they must be).

    python benchmarks/verify_only_ab.py --backend onnxruntime --rounds 2 -o RESULT.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tidar import BUNDLED_MODEL
from tidar.runtime import autotune, bench
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.calibrate import heldout_prompts
from tidar.runtime.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=str(BUNDLED_MODEL))
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per prompt and variant per round (median)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = Path(args.checkpoint)
    reference = TorchBackend.load(model, dtype="float32", attention="sdpa")
    backend = reference
    if args.backend == "onnxruntime":
        from tidar.export.onnx_export import onnxruntime_backend

        backend = onnxruntime_backend(reference.model, tempfile.mkdtemp(prefix="verify-only-ab-"), args.threads)
    tokenizer = Tokenizer(model)
    prompts = heldout_prompts(model, tokenizer, args.prompts, 64)
    acceptance = autotune.load_acceptance(model, backend.config.block_size)
    replayed = autotune.load_replayed(model, backend.config.block_size)
    candidates = autotune.draft_shapes(autotune.candidate_draft_lens(backend.config))
    choice = autotune.choose_draft_len(backend, acceptance, candidates=candidates, replayed=replayed,
                                       tokenizer=tokenizer, budget_s=60)
    b, k = choice.shape
    variants = {"hybrid": None, "hybrid + verify-only": choice.policy}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants)[round_index % 2:] + list(variants)[: round_index % 2]
        for name in order:
            result = bench.run_runtime(backend, tokenizer, b, prompts, args.max_new_tokens, args.repeats, k,
                                       drafter="hybrid", shape_policy=variants[name])
            runs[name].append(result)
            print(f"round {round_index} {name}: {result['tokens_per_second']:.1f} tokens/s, "
                  f"T/NFE {result['tokens_per_forward']:.2f}", flush=True)
    outputs = [r["outputs"] for results in runs.values() for r in results]
    report = {
        "benchmark": "verify_only_ab", "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "command": "python benchmarks/verify_only_ab.py " + " ".join(
            "RESULT.json" if args.output is not None and a == str(args.output) else a
            for a in (argv if argv is not None else sys.argv[1:])),
        "checkpoint": model.name, "backend": args.backend, "threads": args.threads, "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "rounds": args.rounds,
        "chosen_shape": [b, k], "outputs_equal": all(o == outputs[0] for o in outputs),
        "variants": {name: {"tokens_per_second": [round(r["tokens_per_second"], 1) for r in results],
                            "median_tokens_per_second": round(statistics.median(r["tokens_per_second"]
                                                                                for r in results), 1),
                            "tokens_per_forward": round(results[0]["tokens_per_forward"], 3),
                            "proposed_by_source": results[0]["proposed_by_source"],
                            "accepted_by_source": results[0]["accepted_by_source"]}
                     for name, results in runs.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0 if report["outputs_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The ONNX Runtime decode path, before and after: graph opset 18 (as exported before) or 23 (fused
RMSNormalization and RotaryEmbedding nodes), and the KV cache sized by the request or fitted to
the rows (`KVCache.fit`, docs/design.md §3.8), side by side in one run.

For each variant, greedy decoding of held-out prompts (the bundled model's training split) by
this runtime's `DecodeEngine` on ONNX Runtime, at batch 1 (one prompt at a time) and batch 16
(all prompts in one batch), AR and the hybrid drafter at (4, 1), in interleaved rounds (each
round runs every variant once, in a rotated order), median tokens/s over rounds. Every output is
compared with the AR output of the first variant: greedy decoding is lossless.

    python benchmarks/onnx_step.py -o benchmarks/results/onnx_step_bundled_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tidar.export.onnx_export import export_decode_step
from tidar.runtime.backends.onnx_backend import OnnxRuntimeBackend
from tidar.runtime.calibrate import heldout_prompts
from tidar.runtime.checkpoint import load_model
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "tidar-stdlib-qwen2"
VARIANTS = {"opset18, cache by request": (18, False), "opset18, fitted cache": (18, True),
            "opset23, cache by request": (23, False), "opset23, fitted cache": (23, True)}
"""name: (graph opset, whether the engine fits the cache: the backend's `reads_whole_cache`)."""
METHODS = {"ar": (0, None, "tidar"), "hybrid-b4k1": (4, 1, "hybrid")}


def run(backend, tokenizer, prompts, batch: int, method: tuple, max_new_tokens: int) -> tuple[float, list]:
    """(tokens/s, outputs) of decoding `prompts` `batch` at a time."""
    b, k, drafter = method
    engine = DecodeEngine(backend, tokenizer, draft_len=b, draft_blocks=k, drafter=drafter)
    engine.generate([Request(prompts[0], 8, eos_ids=())])  # warm-up
    outputs, started = [], time.perf_counter()
    for first in range(0, len(prompts), batch):
        results = engine.generate([Request(p, max_new_tokens, eos_ids=()) for p in prompts[first:first + batch]])
        outputs += [r.token_ids for r in results]
    return sum(map(len, outputs)) / (time.perf_counter() - started), outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32")
    tokenizer = Tokenizer(args.model)
    prompts = heldout_prompts(args.model, tokenizer, args.prompts, 64)
    with tempfile.TemporaryDirectory() as work:
        backends = {}
        for name, (opset, fit) in VARIANTS.items():
            folder = Path(work) / f"opset{opset}"
            graph = folder / "decode_step.onnx"
            if not graph.exists():
                folder.mkdir()
                export_decode_step(model, graph, opset=opset, head_path=folder / "lm_head.onnx")
            backends[name] = OnnxRuntimeBackend(graph, folder / "lm_head.onnx", model.config, threads=args.threads)
            backends[name].reads_whole_cache = fit
        rates: dict = {}
        reference, equal = None, True
        names = list(VARIANTS)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for batch in (1, len(prompts)):
                for method_name, method in METHODS.items():
                    for name in order:
                        rate, outputs = run(backends[name], tokenizer, prompts, batch, method, args.max_new_tokens)
                        reference = reference if reference is not None else outputs
                        equal = equal and outputs == reference
                        rates.setdefault(f"batch {batch}, {method_name}", {}).setdefault(name, []).append(rate)
                        print(f"round {round_index + 1}: batch {batch} {method_name} {name}: {rate:.1f} tokens/s",
                              file=sys.stderr, flush=True)
    results = {case: {name: {"tokens_per_second": [round(r, 1) for r in values],
                             "median": round(statistics.median(values), 1)} for name, values in by_variant.items()}
               for case, by_variant in rates.items()}
    for case, by_variant in results.items():
        before = by_variant["opset18, cache by request"]["median"]
        for value in by_variant.values():
            value["over_before"] = round(value["median"] / before, 3)
    report = {"benchmark": "benchmarks/onnx_step.py", "command": " ".join(["python", "benchmarks/onnx_step.py",
                                                                         *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "model": args.model.name, "threads": args.threads, "prompts": len(prompts), "prompt_tokens": 64,
              "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "greedy_outputs_equal_ar": equal,
              "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for case, by_variant in results.items():
        print(case + ": " + ", ".join(f"{name} {v['median']:.1f} ({v['over_before']:.2f}x)" for name, v in by_variant.items()))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())

"""Latency of one decode step (forward + verification + bookkeeping) by draft length.

Runs the real `DecodeEngine` on a checkpoint: prefill a prompt, then time individual
`step()` calls (median of repeats) for AR (draft length 0) and TiDAR draft lengths, with each
attention implementation asked for. Prints JSON (and writes it with --out), with the
machine, torch version and date, so figures can be quoted with their provenance.

    python benchmarks/step_latency.py CHECKPOINT --draft-lens 0 4 8 16 --attention eager sdpa flex --threads 1
    python benchmarks/step_latency.py CHECKPOINT --draft-lens 8 16 --batch 1 8 16 --attention sdpa
    python benchmarks/step_latency.py OUT --backend onnxruntime --draft-lens 8 16 --batch 8 16 --threads 1

It uses only the public engine API (`load_backend`, `DecodeEngine`), so the same script times any
commit of the runtime: put that commit's checkout first on PYTHONPATH (with an export built by
it, for onnxruntime).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from tidar.runtime.backends.loading import load_backend
from tidar.runtime.generate import DecodeEngine, Request


def time_steps(backend, draft_len: int, prompt_len: int, repeats: int, warmup: int,
               batch: int = 1, clock=time.perf_counter) -> dict:
    engine = DecodeEngine(backend, draft_len=draft_len)
    vocab = backend.config.vocab_size - 3
    prompts = [[3 + (7 * i + 11 * r) % vocab for i in range(prompt_len + r)] for r in range(batch)]
    engine.add([Request(p, max_new_tokens=(repeats + warmup + 1) * max(draft_len, 1), eos_ids=()) for p in prompts])
    step_times, forward_times = [], []
    # The model's forward: `hidden_states` where the runtime runs the LM head on chosen rows only.
    name = "hidden_states" if hasattr(backend, "hidden_states") else "forward"
    forward = getattr(backend, name)

    def timed_forward(*args, **kwargs):
        start = clock()
        out = forward(*args, **kwargs)
        forward_times.append(clock() - start)
        return out

    setattr(backend, name, timed_forward)
    try:
        for i in range(warmup + repeats):
            start = clock()
            engine.step()
            if i >= warmup:
                step_times.append(clock() - start)
    finally:
        delattr(backend, name)  # back to the class's method
    forward_times = forward_times[warmup:]
    return {
        "draft_len": draft_len,
        "batch": batch,
        "query_tokens": engine.layout.num_new,
        "step_ms_median": round(1000 * statistics.median(step_times), 3),
        "forward_ms_median": round(1000 * statistics.median(forward_times), 3),
        "repeats": repeats,
    }


def time_lm_head(backend, rows: int, repeats: int, clock) -> float:
    """Median ms of the LM head alone on `rows` hidden states (one row of a batch)."""
    hidden = torch.randn(1, rows, backend.config.hidden_size, dtype=backend.model.dtype, device=backend.model.device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first call warms up
            start = clock()
            backend.head(hidden)
            times.append(clock() - start)
    return round(1000 * statistics.median(times[1:]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint (torch) or a `tidar-export build` output (onnxruntime)")
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--draft-lens", type=int, nargs="+", default=[0, 4, 8, 16])
    parser.add_argument("--attention", nargs="+", default=["eager", "sdpa"],
                        help="torch attention implementations (onnxruntime: the graph's own)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="rows per step (each timed)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, and ONNX Runtime intra-op threads (default: each library's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: the calling thread's CPU time (time.thread_time), which a "
                             "busy machine disturbs far less; needs --threads 1 to count all the work")
    parser.add_argument("--lm-head-rows", type=int, nargs="*", default=[],
                        help="also time the LM head alone on these numbers of rows (torch backend), e.g. b(b+1) "
                             "and 2b-1, to compare with a step")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.lm_head_rows and args.backend != "torch":
        parser.error("--lm-head-rows times the torch backend's head")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: give --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    attentions = args.attention if args.backend == "torch" else ["eager"]  # the ONNX graph's dense mask
    for attention in attentions:
        options = {"dtype": args.dtype, "attention": attention}
        if args.backend == "onnxruntime":
            options["threads"] = args.threads or 0
        backend = load_backend(args.backend, args.checkpoint, **options)
        for batch in args.batch:
            for draft_len in args.draft_lens:
                row = time_steps(backend, draft_len, args.prompt_len, args.repeats, args.warmup, batch, clock)
                results.append({"attention": attention, **row})
    report = {
        "benchmark": "step_latency",
        "backend": args.backend,
        "checkpoint": os.path.basename(os.path.normpath(args.checkpoint)),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.system()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "results": results,
    }
    if args.lm_head_rows:
        report["lm_head_ms"] = {str(rows): time_lm_head(backend, rows, args.repeats, clock) for rows in args.lm_head_rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

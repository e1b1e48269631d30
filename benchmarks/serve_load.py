"""Load benchmark of the served `tidar` model: TiDAR against AR under concurrent gRPC streams.

The serving figures (TTFT, ITL, output tokens/s, tokens/s per user) come from NVIDIA's AIPerf
through the OpenAI front: benchmarks/serve_aiperf.py. This script is kept for what AIPerf cannot
measure: both modes on one server through the Triton contract's per-request `mode` input (the
OpenAI front has no such field), tokens per forward (T/NFE) from the responses' counters, the
server's tidar_* counters over each scenario, and per-response (per decode step) ITL.

Renders a Triton model repository for MODEL (default: the bundled checkpoint on the torch
backend; `--backend onnxruntime --model OUT` serves a `tidar-export build` output) into a
temporary folder, starts the real tritonserver on free ports (`tidar.serving.serve.TritonServer`) and
drives it with `tidar.serving.client.request` (tritonclient gRPC streaming) from a thread pool.

Prompts: the held-out prompts of `tidar bench` (`tidar.runtime.bench.heldout_prompts`), greedy.
Scenarios, all on the same server, after one untimed warm-up request per mode:
  tidar @ C   no `mode` input: the server's adaptive draft length        for C in --concurrency
  ar    @ C   mode="ar" (draft length 0)
Concurrency 1 is always run: it is "one at a time", every request sent after the last ended.
Per scenario (median over --repeats):
  aggregate tokens/s   all generated tokens / wall time from the first send to the last answer
  per-request tokens/s median of each request's tokens / its own seconds
  TTFT p50/p90/p99     send -> first response carrying tokens
  ITL p50/p90/p99      gap between consecutive streamed responses (PER RESPONSE, i.e. per
                       decode step, which may carry several tokens in TiDAR mode)
  TPOT                 mean of (last arrival - first arrival) / (tokens - 1) per request
  T/NFE                mean over requests of tokens / forward passes (the responses' counters)
  equals AR            every output equals the AR one-at-a-time output of its prompt token for
                       token (greedy must be lossless); `mismatches` counts those that differ
  server               deltas of the server's tidar_* counters over the scenario (metrics endpoint):
                       drafts, draft/accepted tokens, tokens per forward (histogram sum/count)...;
                       drafts = 0 in TiDAR mode means the server's autotune chose AR
Goal ratios: TiDAR/AR aggregate tokens/s at each concurrency, and the highest concurrency
against one at a time, per mode. Writes OUT/serve_load.json, OUT/serve_load.png and
OUT/tritonserver.log; prints a table.

    python benchmarks/serve_load.py -o serve-bench-out                      # 16 prompts, C = 1 4 16
    python benchmarks/serve_load.py --concurrency 1 4 --prompts 4 --max-tokens 32   # a quick check
    python benchmarks/serve_load.py --backend onnxruntime --model OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import tidar
from tidar.runtime.bench import heldout_prompts
from tidar.serving.repository import render_repository
from tidar.runtime.tokenizer import Tokenizer
from tidar.serving.serve import ServeError, TritonServer, find_tritonserver

try:
    import tritonclient.grpc  # noqa: F401  (tidar.serving.client imports it lazily; fail here, clearly)
except ImportError as exc:
    sys.exit(f"serve_load.py needs tritonclient[grpc] ({exc}); install the serve extra: pip install -e \".[serve]\"")
from tidar.serving.client import request

MODES = {"tidar": {}, "ar": {"mode": "ar"}}
GAUGES = ("tidar_queue_depth", "tidar_active_rows", "tidar_draft_len")
SERIES = re.compile(r"^((?:tidar_|vllm:)[\w:]+)(?:\{(.*)\})?\s+(\S+)$")


def scrape(metrics_url: str) -> dict[str, float]:
    """The server's tidar_* and vllm:* series (model/version/model_name labels dropped; histogram
    buckets skipped)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    series = {}
    for line in text.splitlines():
        match = SERIES.match(line)
        if not match or match[1].endswith("_bucket"):
            continue
        labels = [label for label in (match[2] or "").split(",")
                  if label and not label.startswith(("model=", "version=", "model_name="))]
        key = match[1] + (f"{{{','.join(labels)}}}" if labels else "")
        series[key] = series.get(key, 0.0) + float(match[3])
    return series


def server_delta(metrics_url: str, before: dict[str, float], tokens: int, wait: float = 10.0) -> dict:
    """Counter deltas since `before`, once the server has published the scenario's `tokens`
    (the scheduler publishes after its loop iteration, which may be after the last response)."""
    deadline = time.monotonic() + wait
    while True:
        after = scrape(metrics_url)
        done = after.get("tidar_generated_tokens_total", 0) - before.get("tidar_generated_tokens_total", 0)
        if done >= tokens or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    delta = {key: value - before.get(key, 0.0) for key, value in after.items() if not key.startswith(GAUGES)}
    delta = {key: round(value, 3) for key, value in delta.items() if value}
    count, draft_tokens = delta.get("tidar_tokens_per_forward_count", 0), delta.get("vllm:spec_decode_num_draft_tokens_total", 0)
    delta["tokens_per_forward_mean"] = delta.get("tidar_tokens_per_forward_sum", 0) / count if count else None
    delta["acceptance_rate"] = delta.get("vllm:spec_decode_num_accepted_tokens_total", 0) / draft_tokens if draft_tokens else None
    return delta


def run_scenario(url: str, prompts: list[str], mode: str, concurrency: int, max_tokens: int):
    """All prompts through `concurrency` streams at a time; (results in prompt order, wall seconds)."""
    def one(text):
        return request(url, text, max_tokens=max_tokens, temperature=0.0, **MODES[mode])

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, prompts))
    return results, time.perf_counter() - started


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values) * 1000, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results, wall: float) -> dict:
    tokens = sum(len(r.token_ids) for r in results)
    tpot = [(r.arrivals[-1] - r.arrivals[0]) / (len(r.token_ids) - 1) for r in results if len(r.token_ids) > 1]
    return {
        "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
        "request_tokens_per_second_median": statistics.median(r.tokens_per_second for r in results),
        "ttft_ms": percentiles([r.time_to_first_token for r in results if r.time_to_first_token is not None]),
        "itl_ms_per_response": percentiles([float(g) for r in results for g in r.inter_token_latencies]),
        "tpot_ms_mean": 1000 * statistics.mean(tpot) if tpot else None,
        "tokens_per_forward_mean": statistics.mean(r.tokens_per_forward for r in results),
    }


def median_of(runs: list):
    """Field-wise median of the repeats' summaries (nested dicts too; a missing counter is 0, None stays None)."""
    if isinstance(runs[0], dict):
        keys = dict.fromkeys(key for run in runs for key in run)
        return {key: median_of([run.get(key, 0) for run in runs]) for key in keys}
    values = [v for v in runs if v is not None]
    return statistics.median(values) if values else None


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["options"]["concurrency"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, color in (("tidar", "#76b900"), ("ar", "#555555")):
        runs = [report["scenarios"][f"{mode}@{c}"] for c in levels]
        left.plot(levels, [r["tokens_per_second"] for r in runs], marker="o", color=color, label=mode)
        right.plot(levels, [r["ttft_ms"]["p50"] for r in runs], marker="o", color=color, label=f"{mode} p50")
        right.plot(levels, [r["ttft_ms"]["p99"] for r in runs], marker="x", ls="--", color=color, label=f"{mode} p99")
    for axis, label in ((left, "aggregate tokens / s"), (right, "time to first token (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_title(f"{report['model']} ({report['backend']}), server {report['server_version']}, "
                   f"{report['machine']['cpus']} cpus", fontsize=9)
    right.set_title(f"{report['options']['prompts']} prompts, {report['options']['max_tokens']} tokens, greedy",
                    fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(report: dict) -> str:
    def ms(p):
        return "/".join("–" if p[k] is None else f"{p[k]:.0f}" for k in ("p50", "p90", "p99"))

    lines = [f"{'scenario':<10} {'tok/s':>7} {'req tok/s':>9} {'TTFT ms p50/90/99':>18} "
             f"{'ITL ms/resp p50/90/99':>22} {'TPOT ms':>7} {'T/NFE':>5} {'srv T/F':>7} {'drafts':>6} {'equals AR':>9}"]
    for name, r in report["scenarios"].items():
        srv = r["server"].get("tokens_per_forward_mean")
        equal = "yes" if r["equals_ar"] else f"NO ({r['mismatches']})"
        tpot = "–" if r["tpot_ms_mean"] is None else f"{r['tpot_ms_mean']:.1f}"
        lines.append(f"{name:<10} {r['tokens_per_second']:>7.1f} {r['request_tokens_per_second_median']:>9.1f} "
                     f"{ms(r['ttft_ms']):>18} {ms(r['itl_ms_per_response']):>22} {tpot:>7} "
                     f"{r['tokens_per_forward_mean']:>5.2f} {'–' if srv is None else f'{srv:.2f}':>7} "
                     f"{r['server'].get('vllm:spec_decode_num_drafts_total', 0):>6.0f} {equal:>9}")
    ratios = report["ratios"]
    lines.append("TiDAR/AR tokens/s: " + "  ".join(f"C={c}: {v:.2f}x" for c, v in ratios["tidar_vs_ar"].items()))
    top = report["options"]["concurrency"][-1]
    lines.append(f"C={top} vs one at a time: " + "  ".join(
        f"{mode}: {v:.2f}x" for mode, v in ratios["concurrent_vs_one_at_a_time"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=tidar.BUNDLED_MODEL,
                        help="checkpoint (torch) or `tidar-export build` OUT (onnxruntime); default: bundled model")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt", "trtllm"))
    parser.add_argument("-o", "--out", type=Path, default=Path("serve-bench-out"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="server-side torch / ONNX Runtime threads")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--attention", default="sdpa", help="torch backend attention (default sdpa)")
    parser.add_argument("--dtype", default="float32", help="torch backend compute dtype (default float32, as "
                                                          "`tidar bench`; '' = the checkpoint's)")
    parser.add_argument("--autotune-batch-sizes", default="1,4,16")
    parser.add_argument("--autotune-draft-lens", default="0,1,2,3,4")
    parser.add_argument("--autotune-draft-blocks", default="1,2",
                        help="block counts k tried below k = b for each draft length (empty: k = b only)")
    parser.add_argument("--autotune-repeats", type=int, default=5)
    args = parser.parse_args()
    levels = sorted(set(args.concurrency) | {1})
    try:
        find_tritonserver()
    except ServeError as error:
        sys.exit(f"serve_load.py: {error}")

    model = args.model.resolve()
    tokenizer = Tokenizer(model)
    prompts = [tokenizer.decode(ids) for ids in heldout_prompts(model, tokenizer, args.prompts, args.prompt_tokens)]
    if len(prompts) < args.prompts:
        sys.exit(f"only {len(prompts)} held-out prompts of {args.prompt_tokens} tokens found, {args.prompts} asked")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="tidar-serve-load-") as tmp:
        repo = render_repository(Path(tmp) / "repo", model_dir=str(model), backend=args.backend,
                                 max_batch_size=args.max_batch_size, threads=args.threads, attention=args.attention,
                                 dtype=args.dtype,
                                 autotune_batch_sizes=args.autotune_batch_sizes,
                                 autotune_draft_lens=args.autotune_draft_lens, autotune_repeats=args.autotune_repeats,
                                 autotune_draft_blocks=args.autotune_draft_blocks)
        print(f"starting tritonserver (autotuning at load; log: {args.out / 'tritonserver.log'})", file=sys.stderr)
        with TritonServer(repo, 0, 0, 0, log_file=args.out / "tritonserver.log", ready_timeout=3600) as server:
            with urllib.request.urlopen(f"{server.http_url}/v2", timeout=10) as response:
                server_version = json.loads(response.read()).get("version")
            for mode in MODES:  # warm-up, untimed
                run_scenario(server.grpc_url, prompts[:1], mode, 1, args.max_tokens)
            runs: dict[str, list] = {f"{m}@{c}": [] for c in levels for m in MODES}
            for repeat in range(args.repeats):
                for c in levels:
                    for mode in MODES:
                        name = f"{mode}@{c}"
                        print(f"[{repeat + 1}/{args.repeats}] {name}", file=sys.stderr, flush=True)
                        before = scrape(server.metrics_url)
                        results, wall = run_scenario(server.grpc_url, prompts, mode, c, args.max_tokens)
                        summary = summarize(results, wall)
                        summary["server"] = server_delta(server.metrics_url, before, summary["tokens"])
                        runs[name].append((summary, [r.token_ids for r in results]))

    reference = runs["ar@1"][0][1]
    scenarios = {}
    for name, repeats in runs.items():
        mismatches = sum(ids != ref for _, outputs in repeats for ids, ref in zip(outputs, reference))
        scenarios[name] = {**median_of([summary for summary, _ in repeats]),
                           "tokens_per_second_repeats": [summary["tokens_per_second"] for summary, _ in repeats],
                           "equals_ar": mismatches == 0, "mismatches": mismatches}
    speed = {name: r["tokens_per_second"] for name, r in scenarios.items()}
    report = {
        "benchmark": "serve_load", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads_default": torch.get_num_threads(), "python": platform.python_version()},
        "server_version": server_version, "torch": torch.__version__, "model": model.name, "backend": args.backend,
        "options": {"concurrency": levels, "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
                    "max_tokens": args.max_tokens, "repeats": args.repeats, "sampling": "greedy",
                    "server_threads": args.threads, "max_batch_size": args.max_batch_size,
                    "autotune_batch_sizes": args.autotune_batch_sizes,
                    "autotune_draft_lens": args.autotune_draft_lens, "autotune_draft_blocks": args.autotune_draft_blocks,
                    "autotune_repeats": args.autotune_repeats,
                    "attention": args.attention, "dtype": args.dtype,
                    "itl": "gap between consecutive streamed responses (per decode step), not per token"},
        "scenarios": scenarios,
        "ratios": {"tidar_vs_ar": {str(c): speed[f"tidar@{c}"] / speed[f"ar@{c}"] for c in levels},
                   "concurrent_vs_one_at_a_time": {m: speed[f"{m}@{levels[-1]}"] / speed[f"{m}@1"] for m in MODES}},
    }
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "serve_load.png")
    print(table(report))
    print(f"wrote {args.out / 'serve_load.json'} and {args.out / 'serve_load.png'}")


if __name__ == "__main__":
    main()

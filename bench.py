"""`tidar bench`: TiDAR against AR decoding and its peers, greedy, in one run on one machine.

Methods, all on the same weights in fp32 and the same held-out prompts:
  ar                  AR decoding through this runtime (draft length 0, same code path)
  tidar-b{N}          TiDAR at draft length N
  tidar-auto          TiDAR at the draft length the runtime picks itself (runtime/autotune.py)
  hf-greedy           transformers generate(), greedy
  hf-prompt-lookup    transformers generate() with prompt-lookup speculation
Per method: tokens/s (each prompt's median over repeats; total tokens / total seconds),
T/NFE, median step latency, acceptance per position, and whether every output equals the
AR output token for token. Writes bench.json and bench.png.

Prompts come from the held-out files of the standard-library split the bundled model was
trained with (train/data.py), cut at a line start a third of the way into each file.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tidar.runtime import autotune
from tidar.runtime.backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer


def heldout_prompts(model: Path, tokenizer: Tokenizer, count: int, prompt_tokens: int) -> list[list[int]]:
    """Token prompts from the held-out side of the model's training split (stdlib by default)."""
    from tidar.train.data import expand_globs, split_files

    settings = json.loads((model / "train_config.json").read_text()) if (model / "train_config.json").is_file() \
        else {"files": ["stdlib"], "heldout_percent": 5.0}
    _, heldout = split_files(expand_globs(settings["files"]), settings["heldout_percent"])
    prompts = []
    for path in heldout:
        text = path.read_text(encoding="utf-8", errors="replace")
        start = text.find("\n", len(text) // 3) + 1
        ids = tokenizer.encode(text[start:])[:prompt_tokens]
        if len(ids) == prompt_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def run_runtime(backend, tokenizer, draft_len: int, prompts, max_new_tokens: int, repeats: int) -> dict:
    """One request at a time (batch 1, as the paper measures), `repeats` times each."""
    engine = DecodeEngine(backend, tokenizer, draft_len=draft_len)
    engine.generate([Request(prompts[0], 8, eos_ids=())])  # warm-up, untimed
    outputs, seconds, forwards, steps_seconds, decode_steps = [], [], 0, [], 0
    accepted = [0] * max(draft_len - 1, 0)
    drafts = 0
    for prompt in prompts:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = engine.generate([Request(prompt, max_new_tokens, eos_ids=())])[0]
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times))
        outputs.append(result.token_ids)
        stats = result.stats
        forwards += stats.forward_passes
        drafts += stats.drafts
        accepted = [a + b for a, b in zip(accepted, stats.accepted_per_position)]
        if stats.forward_passes > 1:
            steps_seconds.append(stats.decode_seconds / (stats.forward_passes - 1))
            decode_steps += stats.forward_passes - 1
    tokens = sum(len(o) for o in outputs)
    return {"outputs": outputs, "tokens": tokens, "seconds": sum(seconds),
            "tokens_per_second": tokens / sum(seconds), "tokens_per_forward": tokens / forwards,
            "step_ms_median": 1000 * statistics.median(steps_seconds) if steps_seconds else None,
            "acceptance_per_position": autotune.acceptance_from_stats(accepted, drafts)}


def run_transformers(model_dir: Path, prompts, max_new_tokens: int, repeats: int, prompt_lookup: int | None) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # run to max_new_tokens, as the runtime methods do (eos_ids=())
    config.pad_token_id = 0
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.prompt_lookup_num_tokens = prompt_lookup
    model.generate(torch.tensor([prompts[0]]), generation_config=config, max_new_tokens=4)  # warm-up
    outputs, seconds = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times))
        outputs.append(out[0, len(prompt):].tolist())
    tokens = sum(len(o) for o in outputs)
    return {"outputs": outputs, "tokens": tokens, "seconds": sum(seconds), "tokens_per_second": tokens / sum(seconds)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    names = list(methods)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = left.bar(names, [methods[n]["tokens_per_second"] for n in names], color="#76b900")
    for bar, name in zip(bars, names):
        tpf = methods[name].get("tokens_per_forward")
        if tpf:
            left.annotate(f"T/NFE {tpf:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
    left.set_ylabel("tokens / s (greedy, batch 1)")
    left.set_title(f"{report['model']} on {report['machine']}", fontsize=9)
    left.tick_params(axis="x", rotation=30)
    for name in names:
        rates = methods[name].get("acceptance_per_position")
        if rates:
            right.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
    right.set_xlabel("draft position i")
    right.set_ylabel("P(d_1..d_i accepted)")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench(model: str | Path, out: str | Path, prompts: int = 8, prompt_tokens: int = 64, max_new_tokens: int = 128,
          repeats: int = 3, draft_lens: tuple[int, ...] = (4, 8, 16), peers: bool = True,
          write_acceptance: bool = False, progress=print) -> dict:
    model, out = Path(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backend = TorchBackend.load(model, dtype="float32", attention="sdpa")
    tokenizer = Tokenizer(model)
    block = backend.config.block_size
    draft_lens = tuple(b for b in draft_lens if b <= block)
    prompt_ids = heldout_prompts(model, tokenizer, prompts, prompt_tokens)
    if not prompt_ids:
        raise ValueError(f"no held-out prompt of {prompt_tokens} tokens found")
    methods: dict[str, dict] = {}
    progress("ar")
    methods["ar"] = run_runtime(backend, tokenizer, 0, prompt_ids, max_new_tokens, repeats)
    for b in sorted(set(draft_lens) | {block}):
        progress(f"tidar-b{b}")
        methods[f"tidar-b{b}"] = run_runtime(backend, tokenizer, b, prompt_ids, max_new_tokens, repeats)
    acceptance = methods[f"tidar-b{block}"]["acceptance_per_position"]
    if write_acceptance:
        (model / autotune.ACCEPTANCE_FILE).write_text(json.dumps(
            {"block_size": block, "acceptance": acceptance, "prompts": len(prompt_ids),
             "measured_by": "tidar bench", "date": datetime.date.today().isoformat()}, indent=2) + "\n")
    choice = autotune.choose_draft_len(backend, acceptance)
    progress(f"tidar-auto (b={choice.draft_len})")
    methods["tidar-auto"] = {**run_runtime(backend, tokenizer, choice.draft_len, prompt_ids, max_new_tokens, repeats),
                             "draft_len": choice.draft_len,
                             "expected_tokens_per_second": {str(b): round(v, 2) for b, v in
                                                            choice.expected_tokens_per_second.items()}}
    if peers:
        progress("hf-greedy")
        methods["hf-greedy"] = run_transformers(model, prompt_ids, max_new_tokens, repeats, None)
        progress("hf-prompt-lookup")
        methods["hf-prompt-lookup"] = run_transformers(model, prompt_ids, max_new_tokens, repeats, 10)
    reference = methods["ar"]["outputs"]
    for result in methods.values():
        result["equals_ar"] = result.pop("outputs") == reference
    ar_speed = methods["ar"]["tokens_per_second"]
    for result in methods.values():
        result["speedup_vs_ar"] = result["tokens_per_second"] / ar_speed
    report = {
        "benchmark": "tidar bench", "model": model.name, "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "dtype": "float32", "attention": "sdpa", "batch_size": 1,
        "prompts": len(prompt_ids), "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens,
        "repeats": repeats, "methods": methods,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "bench.png")
    return report


def table(report: dict) -> str:
    """The report as a Markdown table."""
    lines = ["| method | tokens/s | × AR | T/NFE | step ms | equals AR |", "|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        label = f"{name} (b={r['draft_len']})" if "draft_len" in r else name
        tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "–"
        step = f"{r['step_ms_median']:.1f}" if r.get("step_ms_median") else "–"
        lines.append(f"| {label} | {r['tokens_per_second']:.1f} | {r['speedup_vs_ar']:.2f} | {tpf} | {step} | "
                     f"{'yes' if r['equals_ar'] else 'NO'} |")
    return "\n".join(lines)

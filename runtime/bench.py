"""`tidar bench`: TiDAR against AR decoding and its peers, greedy, in one run on one machine.

Methods, all on the same weights in fp32 and the same held-out prompts:
  ar                  AR decoding through this runtime (draft length 0, same code path)
  tidar-b{N}          TiDAR at draft length N (k = N mask blocks, the paper's step)
  tidar-b{N}k{K}      TiDAR at draft length N with K < N mask blocks (docs/design.md §3.4)
  tidar-auto          TiDAR at the draft shape (b, k) the runtime picks itself (runtime/autotune.py)
  (RUNTIME_VARIANTS)  further drafting methods of this runtime at the autotuned shape:
                      tidar-hybrid, the hybrid drafter (TiDAR's block or an n-gram continuation,
                      docs/design.md §3.9); the drafter is then chosen by measured tokens/s
                      (`autotune.choose_drafter`)
  hf-greedy           transformers generate(), greedy
  hf-prompt-lookup    transformers generate() with prompt-lookup speculation
                      (prompt_lookup_num_tokens = PROMPT_LOOKUP_TOKENS)
The runtime methods run on torch (SDPA) or on a backend made from it (`backend_factory`; `tidar
bench --backend onnxruntime`: the standard ONNX graph of the same weights, the CPU serving path); the peers always on torch, with the same
threads. The *default* method is what `tidar generate` does unasked: the autotuned shape with the
default drafter (`default_method`); the report gives its tokens/s over AR's and the peers'.
Per method: tokens/s (each prompt's median over repeats; total tokens / total seconds),
T/NFE, committed tokens per decode step, median step latency, query tokens per step and row,
acceptance per position (accepted / proposed there), proposals verified and accepted per source
(TiDAR's block, n-gram), and whether every output equals the AR output token for token. Only draft lengths the checkpoint was trained with run. The greedy
replay (runtime/calibrate.py, runtime/replay.py) gives the tokens per step of every trained
shape (b, k), k = 1..b, on the same prompts without running the engine per shape. The
autotuner's view is reported beside it: for every candidate shape (AR included) what its race
measured (median whole-step latency with its confidence interval and sample count, or why it
was not timed or left the race), the expected tokens per step (`autotune.expected_tokens_per_step`:
the replayed one) and so the expected tokens/s, the Markov estimate from acceptance
(`autotune.expected_tokens`), next to the measured tokens per step and tokens/s of the shapes
that ran, the chosen shape, and how far tidar-auto's measured tokens/s lands from the best
measured method (`chosen_vs_best`). Writes bench.json and bench.png.

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
from typing import Callable

import torch

from tidar.runtime import autotune, replay
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.calibrate import calibrate, heldout_prompts
from tidar.runtime.calibrate import write_acceptance as write_acceptance_file
from tidar.runtime.counters import Stats
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.ngram import DEFAULT_DRAFTER
from tidar.runtime.tokenizer import Tokenizer


PROMPT_LOOKUP_TOKENS = 10
"""transformers' prompt_lookup_num_tokens of the hf-prompt-lookup peer (its documented example value)."""


def run_runtime(backend, tokenizer, draft_len: int, prompts, max_new_tokens: int, repeats: int,
                draft_blocks: int | None = None, drafter: str = "tidar", shape_policy=None) -> dict:
    """One request at a time (batch 1, as the paper measures), `repeats` times each; with
    `shape_policy` (and a drafter other than tidar) the engine weighs verify-only steps before
    each step (docs/design.md §3.10), starting from the given shape."""
    verify_only = shape_policy is not None and drafter != "tidar"
    engine = DecodeEngine(backend, tokenizer, draft_len=draft_len, draft_blocks=draft_blocks, drafter=drafter,
                          verify_only=verify_only, shape_policy=shape_policy if verify_only else None)
    engine.generate([Request(prompts[0], 8, eos_ids=())])  # warm-up, untimed
    outputs, seconds, forwards, steps_seconds, decode_steps, by_source = [], [], 0, [], 0, Stats()
    accepted = [0] * max(draft_len - 1, 0)
    proposed = [0] * max(draft_len - 1, 0)
    for prompt in prompts:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = engine.generate([Request(prompt, max_new_tokens, eos_ids=())])[0]
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times))
        outputs.append(result.token_ids)
        stats = result.stats
        by_source.add(stats)
        forwards += stats.forward_passes
        accepted = [a + b for a, b in zip(accepted, stats.accepted_per_position)]
        proposed = [a + b for a, b in zip(proposed, stats.proposed_per_position)]
        if stats.forward_passes > 1:
            steps_seconds.append(stats.decode_seconds / (stats.forward_passes - 1))
            decode_steps += stats.forward_passes - 1
    tokens = sum(len(o) for o in outputs)
    b, k = autotune.as_shape((draft_len, draft_blocks) if draft_blocks is not None else draft_len)
    return {"outputs": outputs, "tokens": tokens, "seconds": sum(seconds),
            "tokens_per_second": tokens / sum(seconds), "tokens_per_forward": tokens / forwards,
            "tokens_per_step": replay.tokens_per_decode_step(tokens, len(prompts), decode_steps),
            "step_ms_median": 1000 * statistics.median(steps_seconds) if steps_seconds else None,
            "draft_len": b, "draft_blocks": k, "query_tokens": autotune.query_tokens((b, k)),
            "acceptance_per_position": autotune.acceptance_from_stats(accepted, proposed), "drafter": drafter,
            "proposed_by_source": by_source.proposed_by_source, "accepted_by_source": by_source.accepted_by_source}


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


def method_name(shape: tuple[int, int]) -> str:
    """'ar', 'tidar-b{b}' (k = b) or 'tidar-b{b}k{k}'."""
    b, k = shape
    return "ar" if b == 0 else f"tidar-b{b}" if k == b else f"tidar-b{b}k{k}"


def run_hybrid(backend, tokenizer, prompts, max_new_tokens: int, repeats: int, choice: autotune.DraftChoice) -> dict:
    """The hybrid drafter (docs/design.md §3.9) at the autotuned shape, weighing verify-only steps
    (§3.10) with the race's step seconds, as `tidar generate` decodes by default."""
    shape = choice.shape
    return run_runtime(backend, tokenizer, shape[0], prompts, max_new_tokens, repeats, shape[1], drafter="hybrid",
                       shape_policy=choice.policy)


RUNTIME_VARIANTS: dict[str, Callable[..., dict]] = {"tidar-hybrid": run_hybrid}
"""Further decoding methods of this runtime that `bench` runs after tidar-auto and reports beside
it (table, plot, equal-to-AR check): name -> function(backend, tokenizer, prompts, max_new_tokens,
repeats, choice) returning `run_runtime`'s fields, `choice` the autotuner's `DraftChoice`."""


def chosen_vs_best(methods: dict) -> dict:
    """How far tidar-auto's measured tokens/s lands from the best TiDAR or AR method that ran."""
    runtime = {name: r for name, r in methods.items() if name == "ar" or name.startswith("tidar-")}
    best = max(runtime, key=lambda name: runtime[name]["tokens_per_second"])
    auto = methods["tidar-auto"]["tokens_per_second"]
    return {"best_method": best, "best_tokens_per_second": round(runtime[best]["tokens_per_second"], 2),
            "chosen_tokens_per_second": round(auto, 2),
            "chosen_over_best": round(auto / runtime[best]["tokens_per_second"], 3)}


BackendFactory = Callable[[TorchBackend, Path], object]
"""(the fp32 torch reference backend, the output folder) -> the backend the runtime methods run
on; `tidar bench --backend onnxruntime` passes `export.onnx_export.onnxruntime_backend`'s."""


def default_method() -> str:
    """The method that decodes as `tidar generate` does by default: the autotuned shape with the
    default drafter (ngram.DEFAULT_DRAFTER)."""
    return "tidar-auto" if DEFAULT_DRAFTER == "tidar" else f"tidar-{DEFAULT_DRAFTER}"


def goals(methods: dict) -> dict:
    """The default method's tokens/s over AR's and over each transformers peer's that ran."""
    default = methods[default_method()]["tokens_per_second"]
    return {f"default_over_{name.replace('-', '_')}": round(default / methods[name]["tokens_per_second"], 3)
            for name in ("ar", "hf-greedy", "hf-prompt-lookup") if name in methods}


def bench(model: str | Path, out: str | Path, prompts: int = 8, prompt_tokens: int = 64, max_new_tokens: int = 128,
          repeats: int = 3, draft_lens: tuple[int, ...] = (4, 8, 16), peers: bool = True,
          write_acceptance: bool = False, progress=print,
          draft_blocks: tuple[int, ...] = autotune.DEFAULT_DRAFT_BLOCKS, autotune_budget_s: float | None = None,
          backend_factory: BackendFactory | None = None) -> dict:
    """`draft_lens` b (the trained ones among them) run with k = b and with each k of
    `draft_blocks` below b; the autotuner races every trained b with the same k's, AR included,
    within `autotune_budget_s` (None: no limit but its round limit). The runtime methods run on
    the torch reference (fp32, SDPA) or on what `backend_factory` makes of it; the transformers
    peers always on torch, with the same threads."""
    model, out = Path(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reference = TorchBackend.load(model, dtype="float32", attention="sdpa")
    backend = backend_factory(reference, out) if backend_factory is not None else reference
    backend_name = backend.name
    tokenizer = Tokenizer(model)
    block = backend.config.block_size
    trained = autotune.trained_draft_lens(backend.config)
    draft_lens = tuple(b for b in draft_lens if b in trained)
    prompt_ids = heldout_prompts(model, tokenizer, prompts, prompt_tokens)
    if not prompt_ids:
        raise ValueError(f"no held-out prompt of {prompt_tokens} tokens found")
    methods: dict[str, dict] = {}
    progress("ar")
    methods["ar"] = run_runtime(backend, tokenizer, 0, prompt_ids, max_new_tokens, repeats)
    full = (max(trained), max(trained))
    for shape in sorted(set(autotune.draft_shapes(draft_lens, draft_blocks)) - {(0, 0)} | {full},
                        key=lambda s: (s[0], -s[1])):
        name = method_name(shape)
        progress(name)
        methods[name] = run_runtime(backend, tokenizer, shape[0], prompt_ids, max_new_tokens, repeats, shape[1])
    progress("replay: tokens per step of every trained shape (b, k), k = 1..b")
    # acceptance is a property of the weights: replayed on torch, whose batched block drafts are
    # faster on the CPU than ONNX Runtime's (the engines' outputs are checked against AR below)
    calibration = calibrate(reference, prompt_ids, max_new_tokens, trained)
    acceptance, replayed = calibration.acceptance, calibration.replayed
    if write_acceptance:
        write_acceptance_file(model, calibration, "tidar bench", source="held-out prompts of the training split")
    candidates = autotune.draft_shapes(autotune.candidate_draft_lens(backend.config), draft_blocks)
    progress(f"autotune: racing whole decode steps of {len(candidates)} shapes")
    choice = autotune.choose_draft_len(backend, acceptance, candidates=candidates, replayed=replayed,
                                       tokenizer=tokenizer, budget_s=autotune_budget_s,
                                       progress=lambda line: progress(f"autotune {line}"))
    chosen = choice.shape
    progress(f"tidar-auto ({autotune.shape_name(chosen)})")
    methods["tidar-auto"] = run_runtime(backend, tokenizer, chosen[0], prompt_ids, max_new_tokens, repeats, chosen[1])
    for name, run in RUNTIME_VARIANTS.items():
        progress(name)
        methods[name] = run(backend, tokenizer, prompt_ids, max_new_tokens, repeats, choice)
    drafter_rates = {r["drafter"]: r["tokens_per_second"] for n, r in methods.items()
                     if n == "tidar-auto" or n in RUNTIME_VARIANTS}
    ran = {(r["draft_len"], r["draft_blocks"]): r for n, r in methods.items()
           if "draft_len" in r and n != "tidar-auto" and n not in RUNTIME_VARIANTS}
    expected_rate = choice.expected_tokens_per_second
    race = choice.race.to_json()["candidates"]

    def measured(shape, key, digits):
        value = ran[shape][key] if shape in ran else None
        return None if value is None else round(value, digits)

    def rounded(value, digits):
        return None if value is None else round(value, digits)

    autotune_view = {
        "acceptance": acceptance, "chosen": autotune.shape_name(chosen),
        "best_measured_by_race": autotune.shape_name(choice.race.best_measured),
        "race": {key: value for key, value in choice.race.to_json().items() if key != "candidates"},
        "replay_seconds": round(calibration.seconds, 1),
        "candidates": {autotune.shape_name(c): {
            "draft_len": c[0], "draft_blocks": c[1], "query_tokens": autotune.query_tokens(c),
            **{key: value for key, value in race[autotune.shape_name(c)].items() if key != "expected_tokens_per_step"},
            "expected_tokens_per_step": round(choice.expected_tokens_per_step[c], 4),
            "expected_tokens_per_second": rounded(expected_rate.get(c), 2),
            "replayed_tokens_per_step": rounded(replayed.get(autotune.shape_name(c)), 4),
            "markov_tokens_per_step": round(autotune.expected_tokens(acceptance, *c), 4),
            "measured_tokens_per_step": measured(c, "tokens_per_step", 4),
            "measured_tokens_per_second": measured(c, "tokens_per_second", 2)}
            for c in candidates}}
    for result in methods.values():
        if "draft_len" not in result:
            continue
        shape = (result["draft_len"], result["draft_blocks"])
        result["expected_tokens_per_step"] = round(autotune.expected_tokens_per_step(acceptance, shape, replayed), 4)
        result["expected_tokens_per_second"] = rounded(expected_rate.get(shape), 2)
    if peers:
        progress("hf-greedy")
        methods["hf-greedy"] = run_transformers(model, prompt_ids, max_new_tokens, repeats, None)
        progress(f"hf-prompt-lookup (prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS})")
        methods["hf-prompt-lookup"] = run_transformers(model, prompt_ids, max_new_tokens, repeats, PROMPT_LOOKUP_TOKENS)
    reference = methods["ar"]["outputs"]
    for result in methods.values():
        result["equals_ar"] = result.pop("outputs") == reference
    ar_speed = methods["ar"]["tokens_per_second"]
    for result in methods.values():
        result["speedup_vs_ar"] = result["tokens_per_second"] / ar_speed
    autotune_view["chosen_vs_best"] = chosen_vs_best(methods)
    autotune_view["drafter"] = {"chosen": autotune.choose_drafter(drafter_rates),
                                "tokens_per_second": {name: round(rate, 2) for name, rate in drafter_rates.items()}}
    report = {
        "benchmark": "tidar bench", "model": model.name, "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "dtype": "float32", "backend": backend_name,
        "attention": "sdpa" if backend_name == "torch" else "standard ONNX graph", "batch_size": 1,
        "prompts": len(prompt_ids), "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens,
        "repeats": repeats, "prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS if peers else None,
        "chosen_shape": {"draft_len": chosen[0], "draft_blocks": chosen[1],
                         "query_tokens": autotune.query_tokens(chosen)},
        "default": {"method": default_method(), "drafter": DEFAULT_DRAFTER, **goals(methods)},
        "methods": methods, "autotune": autotune_view,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "bench.png")
    return report


def table(report: dict) -> str:
    """The report as Markdown tables: the methods run, how far the chosen shape lands from the best
    measured one, then every candidate of the autotuner's race."""
    def number(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| method | (b, k) | query tokens/step | tokens/s | expected tokens/s | × AR | T/NFE | tokens/step "
             "| expected tokens/step | step ms | equals AR |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        shape = f"({r['draft_len']}, {r['draft_blocks']})" if "draft_len" in r else "–"
        lines.append(f"| {name} | {shape} | {r.get('query_tokens', '–')} | {r['tokens_per_second']:.1f} | "
                     f"{number(r.get('expected_tokens_per_second'))} | {r['speedup_vs_ar']:.2f} | "
                     f"{number(r.get('tokens_per_forward'), 2)} | {number(r.get('tokens_per_step'), 2)} | "
                     f"{number(r.get('expected_tokens_per_step'), 2)} | {number(r.get('step_ms_median'))} | "
                     f"{'yes' if r['equals_ar'] else 'NO'} |")
    default = report.get("default")
    if default:
        ratios = ", ".join(f"{value:.2f} x {name[len('default_over_'):].replace('_', '-')}"
                           for name, value in default.items() if name.startswith("default_over_"))
        lines += ["", f"Default ({default['method']}: the autotuned shape, drafter {default['drafter']}): {ratios}"]
    view = report.get("autotune")
    if view:
        gap = view.get("chosen_vs_best")
        if gap:
            lines += ["", f"Chosen shape {view['chosen']}: {gap['chosen_tokens_per_second']:.1f} tokens/s, "
                          f"{gap['chosen_over_best']:.3f} x the best measured ({gap['best_method']}, "
                          f"{gap['best_tokens_per_second']:.1f} tokens/s)"]
        drafter = view.get("drafter")
        if drafter:
            rates = ", ".join(f"{name} {rate:.1f}" for name, rate in drafter["tokens_per_second"].items())
            lines += ["", f"Drafter at the chosen shape (tokens/s: {rates}): {drafter['chosen']}"]
        sources = [(name, r) for name, r in report["methods"].items() if r.get("proposed_by_source", {}).get("ngram")]
        for name, r in sources:
            counts = ", ".join(f"{source} {r['accepted_by_source'].get(source, 0)}/{proposed}"
                               for source, proposed in r["proposed_by_source"].items())
            lines += ["", f"{name}: proposals accepted/verified per source: {counts}"]
        race = view.get("race", {})
        lines += ["", f"Autotune race of whole decode steps at batch 1 ({race.get('rounds', '?')} rounds, "
                      f"{race.get('seconds', '?')} s, stopped: {race.get('stop', '?')}); expected tokens/step: "
                      f"replayed; chosen: {view['chosen']}", "",
                  "| shape | query tokens/step | step ms [95 % interval] | samples | expected tokens/step "
                  "| Markov tokens/step | measured tokens/step | expected tokens/s | measured tokens/s | race |",
                  "|---|---|---|---|---|---|---|---|---|---|"]

        def order(item):
            rate = item[1].get("expected_tokens_per_second")
            return (rate is None, -(rate or 0.0))
        for name, c in sorted(view["candidates"].items(), key=order):
            mark = " ←" if name == view["chosen"] else ""
            step = "–" if c.get("step_ms") is None else \
                f"{c['step_ms']:.2f} [{c['step_ms_interval'][0]:.2f}, {c['step_ms_interval'][1]:.2f}]"
            fate = c.get("skipped") or (f"out in round {c['eliminated_in_round']}" if "eliminated_in_round" in c
                                        else "to the end")
            lines.append(f"| {name}{mark} | {c['query_tokens']} | {step} | {c.get('samples', 0)} | "
                         f"{c['expected_tokens_per_step']:.2f} | {number(c.get('markov_tokens_per_step'), 2)} | "
                         f"{number(c.get('measured_tokens_per_step'), 2)} | {number(c['expected_tokens_per_second'])} | "
                         f"{number(c['measured_tokens_per_second'])} | {fate} |")
    return "\n".join(lines)

"""GPU acceptance: one command that checks the GPU paths on one H100/H200 in under 8 minutes.

    bash benchmarks/gpu_acceptance.sh [-o OUT] [--sections a b c d e f g h i]
    python benchmarks/gpu_acceptance.py [-o OUT] [--sections ...]

Needs PyTorch with CUDA and Triton; nothing else, no network. Writes OUT/gpu_acceptance.json and
OUT/gpu_acceptance.png (default OUT: benchmarks/results/gpu_acceptance-<UTC date>), stamped with
date, device, driver and versions. Exit status 0 when every check passes, 1 on any mismatch, 2
at once without CUDA (with the reason on stderr; nothing written).

One function per section, each returning {"ok": bool, ...} (a later section, e.g. CUDA graphs, is
one more function in SECTIONS):
 a  decode loop on CUDA through the torch backend (eager, SDPA, the Triton kernel): greedy tokens
    identical to the CPU float32 run, on the bundled model and on a random Qwen2.5-1.5B-shaped
    model in float32 (TF32 off); seeded sampling gives the same tokens twice.
 b  the kernel against the dense-mask reference (eager attention in float32) on CUDA: decode,
    prefill and training layouts; fp16 / bf16; head dims 64 and 128; b = 4, 8, 16. Passes when
    its error is within twice SDPA's (same dtype, same reference) plus a small floor.
 c  kernel time against torch.compile'd FlexAttention and SDPA with the dense mask (1.5B shape,
    bf16, batch 1), b = 4, 8, 16, past 512, 2048, 8192 (benchmarks/gpu_attention.py's case).
 d  forward latency of the random 1.5B shape in bf16 as query tokens grow 1..512 (the "free
    token" curve) and the TiDAR step (b = 16, 272 tokens) over the AR step (1 token).
 e  TiDAR against AR tokens/s end to end (DecodeEngine, 1.5B shape, bf16, Triton attention) at
    batch 1 and 16. Random weights accept almost no drafts, so the TiDAR figure is the measured
    decode-step rate times the paper's tokens per forward (T/NFE 7.45 at b = 16): labelled
    "simulated acceptance". AR is measured as it is (one token per forward).
 f  where TensorRT / TensorRT-LLM are importable, the engines of the bundled model are built in
    float32 (`tidar-export build --dtype float32`: like with like) and compared with the float32
    torch backend (TF32 off): prefill logits within LOGIT_TOLERANCE (TensorRT may use TF32 in
    float32 layers) and the same argmax wherever the reference's top-2 margin exceeds twice it;
    greedy tokens at b = 0, 4, 16 are reported. Each engine is then served at its batch limit
    (the rendered repository's options, `build_scheduler`: start-up autotune and max_batch_size
    concurrent requests, all finished). Otherwise each is recorded as skipped with the reason.
 g  CUDA graphs of the torch backend (runtime/backends/cuda_graphs.py): greedy tokens with graphs equal
    those without (bundled model, float32, SDPA and the Triton kernel) while requests join and
    leave a batch and the draft shape (b, k) changes, every decode step a replay; whole decode-step
    latency with and without graphs (random 1.5B shape, bf16) at batch 1, 8, 16 and b = 0, 4, 8, 16.

 h  graphs captured at start-up: `build_scheduler` on the bundled model (torch, CUDA, graphs on)
    captures every graph before it returns (start-up seconds and peak memory reported); serving
    max_batch_size concurrent requests of varying lengths then captures none, runs no adaptive
    step eagerly and never reallocates the cache.
 i  a second device, where two GPUs exist (skipped with the reason on one): the same served run
    on cuda:1 from a scheduler thread, tokens equal to cuda:0's, and no memory allocated on
    cuda:0 meanwhile (the kernel launches and the scheduler thread's device are cuda:1's).

The torch backend on CUDA runs its decode steps as CUDA graphs by default, so sections a and e
measure and check the graphed path; g compares it with the eager one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PAPER_TOKENS_PER_FORWARD = 7.45  # TiDAR 1.5B, b = 16 (the paper's T/NFE)
PAPER_DRAFT_LEN = 16
LOGIT_TOLERANCE = 5e-2
"""Section f: largest |logit difference| allowed between a float32 engine and the float32 torch
backend (logits of the bundled model are O(10); TF32 products carry about 1e-3 relative error)."""
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]
SECTIONS = {}


def section(letter: str):
    def register(function):
        SECTIONS[letter] = function
        return function
    return register


# ---------------------------------------------------------------- plain logic (tested on CPU)
def cuda_problem() -> str | None:
    """Why this machine cannot run the acceptance (None: it can)."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable: {error}"
    return None


def simulated_tokens_per_second(steps_per_second: float, batch: int,
                                tokens_per_forward: float = PAPER_TOKENS_PER_FORWARD) -> float:
    """Tokens/s of `batch` rows that each take `tokens_per_forward` tokens per decode step."""
    return steps_per_second * batch * tokens_per_forward


def verdict(report: dict) -> int:
    """Exit status of a finished report: 0 when every section ran and passed (a skip is a pass
    only when it says why), 1 otherwise."""
    for name, result in report["sections"].items():
        if result.get("skipped"):
            if not result.get("reason"):
                return 1
        elif not result.get("ok"):
            return 1
    return 0


def within(error: float, baseline: float, floor: float) -> bool:
    return error <= 2 * baseline + floor


def cache_with_past(model, batch: int, past: int, room: int):
    """A cache of `batch` rows of random K/V with `past` committed tokens each (on the host and
    the device, where `plan` and the kernels read them) and `room` free slots after them."""
    cache = model.new_cache(batch, past + room)
    cache.keys.normal_()
    cache.values.normal_()
    cache.lengths = [past] * batch
    return cache


def logits_agree(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float = LOGIT_TOLERANCE) -> dict:
    """Compare logits [..., vocab] of the same positions: the largest |difference| must be within
    `tolerance` and the argmax the same wherever the reference's top-2 margin exceeds 2 x
    `tolerance` (closer calls may flip within the tolerance)."""
    reference, candidate = reference.float().reshape(-1, reference.shape[-1]), candidate.float().reshape(
        -1, candidate.shape[-1])
    error = (reference - candidate).abs().max().item()
    top = reference.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * tolerance
    flips = int((reference.argmax(-1) != candidate.argmax(-1))[clear].sum())
    return {"max_abs_error": error, "tolerance": tolerance, "clear_positions": int(clear.sum()),
            "argmax_flips": flips, "ok": error <= tolerance and flips == 0}


def second_device_problem() -> str | None:
    """Why section i cannot run here (None: it can)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return f"one CUDA device here (torch.cuda.device_count() = {count}); the second-device check needs two"
    return None


def serve_all(scheduler, prompts: list[list[int]], lengths: list[int], timeout: float = 300.0) -> list[list[int]]:
    """Submit every (prompt, max new tokens) to `scheduler` at once; the tokens of each, in order.
    Raises RuntimeError naming a request that failed or did not finish."""
    import threading

    from tidar.runtime.generate import Request
    from tidar.runtime.sampling import SamplingParams

    outputs, errors, done = [[] for _ in prompts], [], threading.Semaphore(0)

    def callbacks(index):
        def on_delta(delta):
            outputs[index].extend(delta.token_ids)
            if delta.finished:
                done.release()

        def on_error(kind, message):
            errors.append(f"request {index}: {kind}: {message}")
            done.release()
        return on_delta, on_error

    for index, (prompt, length) in enumerate(zip(prompts, lengths)):
        scheduler.submit(Request(prompt, length, SamplingParams(), eos_ids=()), *callbacks(index))
    for index in range(len(prompts)):
        if not done.acquire(timeout=timeout):
            raise RuntimeError(f"{len(prompts) - index} requests did not finish within {timeout:g} s")
    if errors:
        raise RuntimeError("; ".join(errors))
    return outputs


def graph_speedups(latency: list[dict]) -> dict[str, float]:
    """Eager step time over graphed step time per (attention, batch, draft length) of section g's
    `step_latency` rows."""
    times = {(r["attention"], r["batch"], r["draft_len"], r["cuda_graphs"]): r["ms"] for r in latency}
    return {f"{attention} batch {batch} b {b}": times[(attention, batch, b, False)] / ms
            for (attention, batch, b, graphs), ms in sorted(times.items()) if graphs}


# ---------------------------------------------------------------- environment
def environment() -> dict:
    import triton

    driver = "unknown"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        driver = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else driver
    except (OSError, subprocess.SubprocessError):
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv)}


def _gpu_attention():
    sys.path.insert(0, str(HERE))
    import gpu_attention

    return gpu_attention


def _random_15b(folder: Path) -> Path:
    """A random-weight Qwen2.5-1.5B-shaped checkpoint (bf16 on disk) in `folder`."""
    sys.path.insert(0, str(HERE))
    from make_random_checkpoint import qwen25_15b_shape, write_checkpoint

    if not (folder / "config.json").exists():
        write_checkpoint(folder, qwen25_15b_shape())
    return folder


def _greedy(backend, tokenizer, draft_len: int, max_new: int) -> list[list[int]]:
    from tidar.runtime.generate import DecodeEngine, Request

    requests = [Request(tokenizer.encode(p), max_new, eos_ids=()) for p in PROMPTS]
    return [r.token_ids for r in DecodeEngine(backend, tokenizer, draft_len).generate(requests)]


def _greedy_joining(backend, tokenizer, shapes=((4, None), (0, None), (16, None), (8, 2))) -> list[list[int]]:
    """Greedy tokens of requests that join a running batch one by one and leave it at different
    steps (different lengths), the draft shape (b, k) changing every three steps."""
    from tidar.runtime.generate import DecodeEngine, Request

    engine = DecodeEngine(backend, tokenizer, shapes[0][0], max_rows=8, max_len=512)
    pending = [Request(tokenizer.encode(p), 16 + 8 * i, eos_ids=(), request_id=i) for i, p in enumerate(PROMPTS * 2)]
    tokens: dict[int, list[int]] = {}

    def take(deltas):
        for delta in deltas:
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)

    take(engine.add(pending[:2]))
    pending, step = pending[2:], 0
    while engine.rows or pending:
        if pending and (step % 2 or not engine.rows):
            take(engine.add(pending[:1]))
            pending = pending[1:]
        engine.set_draft_len(*shapes[step // 3 % len(shapes)])
        if engine.rows:
            take(engine.step())
            step += 1
    return [tokens[i] for i in sorted(tokens)]


# ---------------------------------------------------------------- sections
@section("a")
def decode_loop(context: dict) -> dict:
    from tidar import BUNDLED_MODEL
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.generate import DecodeEngine, Request
    from tidar.runtime.sampling import SamplingParams
    from tidar.runtime.tokenizer import Tokenizer

    checks = []
    models = {"bundled": (BUNDLED_MODEL, 32), "random-qwen2.5-1.5b": (context["random_15b"], 8)}
    for model, (path, max_new) in models.items():
        tokenizer = Tokenizer(path)
        cpu = load_backend("torch", path, dtype="float32", attention="eager", device="cpu")
        expected = {b: _greedy(cpu, tokenizer, b, max_new) for b in (0, 4)}
        del cpu
        for attention in ("eager", "sdpa", "triton"):
            gpu = load_backend("torch", path, dtype="float32", attention=attention, device="cuda")
            for draft_len, tokens in expected.items():
                got = _greedy(gpu, tokenizer, draft_len, max_new)
                checks.append({"model": model, "attention": attention, "draft_len": draft_len,
                               "identical": got == tokens, "tokens": sum(map(len, got))})
            if model == "bundled":
                sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
                request = [Request(tokenizer.encode(PROMPTS[0]), 32, sampling=sampling, eos_ids=())]
                runs = [DecodeEngine(gpu, tokenizer, 4).generate(request)[0].token_ids for _ in range(2)]
                checks.append({"model": model, "attention": attention, "sampling": "t=0.8 top_p=0.95 seed=1234",
                               "identical": runs[0] == runs[1], "tokens": len(runs[0])})
            del gpu
            torch.cuda.empty_cache()
    return {"ok": all(c["identical"] for c in checks), "checks": checks}


@section("b")
def kernel_accuracy(context: dict) -> dict:
    import torch.nn.functional as F

    from tidar.plugins.hybrid_attention import hybrid_attention
    from tidar.runtime.layout import Layout
    from tidar.runtime.model import eager_attention

    floors = {"float16": 2e-3, "bfloat16": 1.6e-2}
    checks = []
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype_name, floor in floors.items():
        dtype = getattr(torch, dtype_name)
        for head_dim in (64, 128):
            for b in (4, 8, 16):
                layouts = {"decode": (Layout.decode(b), 300), "prefill": (Layout.prefill(100, b), 0),
                           "training": (Layout.training(16 * b, b), 0)}
                for name, (layout, past) in layouts.items():
                    batch, heads, kv_heads = 2, 12, 2
                    new, kv_len = layout.num_new, past + layout.num_new
                    q = torch.randn(batch, heads, new, head_dim, device="cuda", dtype=dtype, generator=generator)
                    k, v = (torch.randn(batch, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype,
                                        generator=generator) for _ in range(2))
                    past_lens = torch.tensor([past, max(past - 7, 0)], device="cuda")
                    mask = layout.dense_mask(past_lens, kv_len)[:, None]
                    scale = head_dim ** -0.5
                    reference = eager_attention(q.float(), k.float(), v.float(), mask, scale)
                    kernel = hybrid_attention(q, k, v, past_lens, **layout.kernel_scalars(), scale=scale)
                    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
                    error = (kernel.float() - reference).abs().max().item()
                    baseline = (sdpa.float() - reference).abs().max().item()
                    checks.append({"dtype": dtype_name, "head_dim": head_dim, "draft_len": b, "layout": name,
                                   "max_error": error, "sdpa_error": baseline,
                                   "ok": within(error, baseline, floor) and bool(torch.isfinite(kernel).all())})
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


@section("c")
def kernel_speed(context: dict) -> dict:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    gpu_attention = _gpu_attention()
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    flex = torch.compile(flex_attention, dynamic=False)
    timing = argparse.Namespace(warmup=5, repeats=20)
    cases = []
    for b in (4, 8, 16):
        for past in (512, 2048, 8192):
            case = gpu_attention.attention_case(gpu_attention.MODELS["qwen2.5-1.5b"], b, past, 1, torch.bfloat16,
                                                flex, timing)
            case["flex_over_triton"] = case["ms"]["flex"] / case["ms"]["triton"]
            cases.append(case)
    goal = [c["flex_over_triton"] for c in cases if c["draft_len"] == 16 and c["past"] >= 2048]
    return {"ok": True, "cases": cases, "speedup_vs_flex_b16_past_ge_2048": min(goal),
            "goal": ">= 1.3x (reported, not enforced)"}


@section("d")
def free_token_curve(context: dict) -> dict:
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.layout import Layout

    gpu_attention = _gpu_attention()
    backend = load_backend("torch", context["random_15b"], dtype="bfloat16", attention="sdpa", device="cuda")
    model, past = backend.model, 1024
    layouts = [("causal", q, Layout.autoregressive(q)) for q in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    layouts.append(("decode", PAPER_DRAFT_LEN, Layout.decode(PAPER_DRAFT_LEN)))
    cache = cache_with_past(model, 1, past, 512)  # the host copy of the lengths is what plan() reads
    results = []
    for attention in ("sdpa", "triton"):
        model.set_attention(attention)
        for kind, size, layout in layouts:
            ids = torch.randint(0, model.config.vocab_size, (1, layout.num_new), device="cuda")
            with torch.no_grad():
                ms = gpu_attention.median_ms(lambda: model(ids, layout, cache), 3, 10)
            results.append({"attention": attention, "kind": kind, "size": size, "query_tokens": layout.num_new,
                            "ms": ms})
    ratios = {}
    for attention in ("sdpa", "triton"):
        mine = {(r["kind"], r["size"]): r["ms"] for r in results if r["attention"] == attention}
        ratios[attention] = mine[("decode", PAPER_DRAFT_LEN)] / mine[("causal", 1)]
    del backend, model, cache
    torch.cuda.empty_cache()
    return {"ok": True, "past": past, "dtype": "bfloat16", "results": results, "tidar_over_ar_step": ratios,
            "goal": "<= 1.3x at batch 1 (reported, not enforced; the paper implies about 1.6x)"}


@section("e")
def end_to_end(context: dict) -> dict:
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.generate import DecodeEngine, Request
    from tidar.runtime.tokenizer import Tokenizer

    path = context["random_15b"]
    tokenizer = Tokenizer(path)
    backend = load_backend("torch", path, dtype="bfloat16", attention="triton", device="cuda")
    prompt = tokenizer.encode("def main():\n    " * 8)
    rows = []
    for batch in (1, 16):
        for mode, draft_len in (("ar", 0), ("tidar", PAPER_DRAFT_LEN)):
            requests = [Request(prompt, 48, eos_ids=()) for _ in range(batch)]
            engine = DecodeEngine(backend, tokenizer, draft_len)
            engine.generate(requests)  # warm-up (Triton compiles, allocator, CUDA graph capture) on the same cache
            torch.cuda.synchronize()
            start = time.perf_counter()
            results = engine.generate(requests)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            forwards = max(r.stats.forward_passes for r in results)
            tokens = sum(len(r.token_ids) for r in results)
            row = {"batch": batch, "mode": mode, "draft_len": draft_len, "seconds": seconds, "forwards": forwards,
                   "measured_tokens_per_second": tokens / seconds, "steps_per_second": forwards / seconds}
            if mode == "tidar":
                row["simulated_tokens_per_second"] = simulated_tokens_per_second(forwards / seconds, batch)
                row["label"] = f"simulated acceptance (T/NFE {PAPER_TOKENS_PER_FORWARD} at b = {PAPER_DRAFT_LEN})"
            rows.append(row)
    speedups = {}
    for batch in (1, 16):
        ar = next(r for r in rows if r["batch"] == batch and r["mode"] == "ar")
        tidar = next(r for r in rows if r["batch"] == batch and r["mode"] == "tidar")
        speedups[str(batch)] = tidar["simulated_tokens_per_second"] / ar["measured_tokens_per_second"]
    del backend
    torch.cuda.empty_cache()
    return {"ok": True, "rows": rows, "simulated_speedup_over_ar": speedups,
            "note": "random weights: TiDAR tokens/s is the measured step rate times the paper's T/NFE"}


@section("f")
def engines(context: dict) -> dict:
    from tidar import BUNDLED_MODEL
    from tidar.export.build import build, engine_skip_reasons
    from tidar.export.verify import greedy_mismatch
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.tokenizer import Tokenizer

    reasons = engine_skip_reasons("auto")
    result = {"ok": True}
    names = {"engine": "trtllm", "tensorrt": "tensorrt"}
    buildable = [step for step, reason in reasons.items() if reason is None]
    for step, reason in reasons.items():
        if reason:
            result[names[step]] = {"skipped": True, "reason": reason}
    if not buildable:
        return {"skipped": True, "reason": "; ".join(f"{names[s]}: {r}" for s, r in reasons.items()), **result}
    out = Path(context["workdir"]) / "export"
    started = time.perf_counter()
    manifest = build(BUNDLED_MODEL, out, dtype="float32", engine="auto", progress=False)  # like with like
    result["build_seconds"] = time.perf_counter() - started
    reference = load_backend("torch", BUNDLED_MODEL, dtype="float32", device="cuda")
    tokenizer = Tokenizer(BUNDLED_MODEL)
    for step in buildable:
        if step not in manifest["built"]:
            result[names[step]] = {"built": False, "skipped": next(s["reason"] for s in manifest["skipped"]
                                                                   if s["step"] == step)}
            result["ok"] = False
            continue
        backend = load_backend(names[step], out)
        logits = _prefill_logits_agree(reference, backend, tokenizer)
        mismatch = greedy_mismatch(reference, backend, tokenizer, (0, 4, 16))
        served = _serve_at_batch_limit(out, names[step], manifest["engines"][step], tokenizer)
        result[names[step]] = {"built": True, "logits": logits, "greedy_identical": mismatch is None,
                               "first_mismatching_draft_len": mismatch, "served_at_batch_limit": served,
                               "record": manifest["engines"].get(step)}
        result["ok"] = result["ok"] and logits["ok"] and served["ok"]
        del backend
        torch.cuda.empty_cache()
    return result


def _prefill_logits_agree(reference, candidate, tokenizer) -> dict:
    """`logits_agree` over a causal prefill of each prompt (one forward of each backend)."""
    from tidar.runtime.layout import Layout

    checks = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)], device="cuda")
        layout = Layout.autoregressive(ids.shape[1])
        logits = [backend.forward(ids, layout, backend.new_cache(1, ids.shape[1])) for backend in (reference, candidate)]
        checks.append(logits_agree(*logits))
    return {"ok": all(c["ok"] for c in checks), "max_abs_error": max(c["max_abs_error"] for c in checks),
            "argmax_flips": sum(c["argmax_flips"] for c in checks), "tolerance": LOGIT_TOLERANCE}


def _serve_at_batch_limit(out: Path, backend: str, record: dict, tokenizer) -> dict:
    """Serve the export on `backend` with the options its rendered repository carries
    (max_batch_size = the engine's limit) and that many concurrent requests."""
    import re

    from tidar.serving.options import ServingOptions
    from tidar.serving.requests import build_scheduler

    text = (out / "triton_repo" / "tidar" / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
    options = ServingOptions.from_parameters(parameters)
    options.backend, options.autotune_repeats = backend, 1  # the repository serves its best engine; a short autotune
    scheduler, *_ = build_scheduler(out, options, device="cuda", progress=lambda line: None)
    try:
        rows = options.max_batch_size
        prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(rows)]
        outputs = serve_all(scheduler, prompts, [8 + 4 * (i % 5) for i in range(rows)])
    finally:
        scheduler.close()
    return {"ok": rows == record["max_batch_size"] and all(outputs), "max_batch_size": rows,
            "engine_max_batch_size": record["max_batch_size"], "autotune_batch_sizes": list(options.autotune_batch_sizes),
            "tokens": sum(map(len, outputs))}


@section("g")
def cuda_graphs(context: dict) -> dict:
    from tidar import BUNDLED_MODEL
    from tidar.runtime.autotune import measure_engine_step_seconds
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.backends.torch_backend import TorchBackend
    from tidar.runtime.tokenizer import Tokenizer

    checks = []
    tokenizer = Tokenizer(BUNDLED_MODEL)
    for attention in ("sdpa", "triton"):
        graphed = load_backend("torch", BUNDLED_MODEL, dtype="float32", attention=attention, device="cuda",
                               cuda_graphs=True)
        eager = TorchBackend(graphed.model, cuda_graphs=False)
        expected, got = _greedy_joining(eager, tokenizer), _greedy_joining(graphed, tokenizer)
        counts = {"captures": graphed.graphs.captures, "replays": graphed.graphs.replays}
        checks.append({"model": "bundled", "attention": attention, "identical": got == expected,
                       "tokens": sum(map(len, got)), **counts, "ok": got == expected and counts["replays"] > counts[
                           "captures"] > 0})
        del graphed, eager
        torch.cuda.empty_cache()
    path = context["random_15b"]
    tokenizer = Tokenizer(path)
    latency = []
    for attention in ("sdpa", "triton"):
        graphed = load_backend("torch", path, dtype="bfloat16", attention=attention, device="cuda", cuda_graphs=True)
        eager = TorchBackend(graphed.model, cuda_graphs=False)
        for batch in (1, 8, 16):
            for backend in (eager, graphed):
                seconds = measure_engine_step_seconds(backend, tokenizer, [0, 4, 8, 16], batch=batch, repeats=5)
                latency += [{"attention": attention, "batch": batch, "draft_len": b,
                             "cuda_graphs": backend.graphs is not None, "ms": 1e3 * step} for b, step in seconds.items()]
        del graphed, eager
        torch.cuda.empty_cache()
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "step_latency": latency,
            "eager_over_graphs": graph_speedups(latency),
            "note": "whole DecodeEngine.step (forward, verification, drafting), past about 128 tokens, median of 5; "
                    "latency reported, not enforced"}


def _served_run(device: str, rows: int = 16) -> dict:
    """Serve the bundled model on `device` through `build_scheduler` (torch backend, SDPA, CUDA
    graphs on): start-up time and memory, captures at start-up and while `rows` concurrent
    requests of varying lengths are served, the outputs."""
    from tidar import BUNDLED_MODEL
    from tidar.runtime.tokenizer import Tokenizer
    from tidar.serving.options import ServingOptions
    from tidar.serving.requests import build_scheduler

    options = ServingOptions(model_dir=str(BUNDLED_MODEL), backend="torch", attention="sdpa", dtype="float32",
                             max_batch_size=rows, autotune_repeats=1, autotune_budget=20.0)
    on_cuda, index = torch.device(device).type == "cuda", torch.device(device).index or 0
    if on_cuda:  # (the logic also runs on a CPU, with capture stood in: tests/test_gpu_acceptance.py)
        torch.cuda.reset_peak_memory_stats(index)
        before = torch.cuda.memory_allocated(index)
    started = time.perf_counter()
    scheduler, tokenizer, _, _ = build_scheduler(BUNDLED_MODEL, options, device=device, progress=lambda line: None)
    startup = time.perf_counter() - started
    graphs = scheduler.backend.graphs
    prepared = graphs.captures
    try:
        prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)] * (1 + i % 3)) for i in range(rows)]
        outputs = serve_all(scheduler, prompts, [6 + 5 * (i % 7) for i in range(rows)])
        cache = scheduler.engines["adaptive"].cache
        result = {"startup_seconds": startup, "graphs_at_startup": prepared,
                  "captures_while_serving": graphs.captures - prepared, "uncaptured_steps": graphs.uncaptured_steps,
                  "replays": graphs.replays, "cache_allocations": cache.allocations,
                  "cache": [cache.max_rows, cache.capacity],
                  "outputs": outputs}
        if on_cuda:
            result["startup_peak_mib"] = (torch.cuda.max_memory_allocated(index) - before) / 2 ** 20
    finally:
        scheduler.close()
    result["ok"] = (result["captures_while_serving"] == 0 and result["uncaptured_steps"] == 0
                    and result["cache_allocations"] == 1 and result["replays"] > 0 and all(outputs))
    return result


@section("h")
def graphs_at_startup(context: dict) -> dict:
    result = _served_run("cuda:0")
    context["served_cuda0"] = result.pop("outputs")
    return result


@section("i")
def second_device(context: dict) -> dict:
    problem = second_device_problem()
    if problem:
        return {"skipped": True, "reason": problem}
    if "served_cuda0" not in context:
        context["served_cuda0"] = _served_run("cuda:0")["outputs"]
    torch.cuda.synchronize(0)
    on_first = torch.cuda.memory_allocated(0)
    result = _served_run("cuda:1")
    torch.cuda.synchronize(0)
    result["cuda0_allocated_meanwhile_bytes"] = torch.cuda.memory_allocated(0) - on_first
    result["same_tokens_as_cuda0"] = result.pop("outputs") == context["served_cuda0"]
    result["ok"] = result["ok"] and result["same_tokens_as_cuda0"] and result["cuda0_allocated_meanwhile_bytes"] == 0
    return result


# ---------------------------------------------------------------- report
def plot(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    sections = report["sections"]
    ax = axes[0][0]
    for index, impl in enumerate(("triton", "flex", "sdpa")):
        for b, style in ((4, ":"), (8, "--"), (16, "-")):
            points = sorted((c["past"], c["ms"][impl]) for c in sections.get("c", {}).get("cases", [])
                            if c["draft_len"] == b)
            if points:
                ax.plot(*zip(*points), color=f"C{index}", linestyle=style, marker="o", label=f"{impl} b={b}")
    ax.set(xscale="log", yscale="log", xlabel="past length", ylabel="ms", title="c: attention call, 1.5B shape, bf16")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for index, attention in enumerate(("sdpa", "triton")):
        rows = [r for r in sections.get("d", {}).get("results", []) if r["attention"] == attention]
        curve = sorted((r["query_tokens"], r["ms"]) for r in rows if r["kind"] == "causal")
        if curve:
            ax.plot(*zip(*curve), color=f"C{index}", marker="o", label=attention)
        steps = [(r["query_tokens"], r["ms"]) for r in rows if r["kind"] == "decode"]
        if steps:
            ax.plot(*zip(*steps), color=f"C{index}", marker="*", markersize=12, linestyle="none")
    ax.set(xscale="log", xlabel="query tokens (star: TiDAR step b=16)", ylabel="ms",
           title="d: one forward, 1.5B shape, bf16, past 1024")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    rows = sections.get("e", {}).get("rows", [])
    labels = [f"{r['mode']} x{r['batch']}" for r in rows]
    values = [r.get("simulated_tokens_per_second", r["measured_tokens_per_second"]) for r in rows]
    ax.bar(labels, values, color=["C7" if r["mode"] == "ar" else "C0" for r in rows])
    ax.set(ylabel="tokens/s", title="e: end to end (TiDAR: simulated acceptance, T/NFE 7.45)")
    ax = axes[1][1]
    checks = sections.get("b", {}).get("checks", [])
    for index, dtype in enumerate(("float16", "bfloat16")):
        mine = [c for c in checks if c["dtype"] == dtype]
        ax.scatter([c["sdpa_error"] for c in mine], [c["max_error"] for c in mine], color=f"C{index}", label=dtype)
    ax.set(xscale="log", yscale="log", xlabel="SDPA max error vs fp32", ylabel="kernel max error vs fp32",
           title="b: kernel accuracy (decode, prefill, training)")
    ax.legend(fontsize=8)
    stamp = report["environment"]
    status = "PASS" if verdict(report) == 0 else "FAIL"
    figure.suptitle(f"tidar GPU acceptance {status}: {stamp['device']}, driver {stamp['driver']}, "
                    f"torch {stamp['torch']}, triton {stamp['triton']}, {stamp['date']}")
    figure.tight_layout()
    return figure


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report).savefig(out / "gpu_acceptance.png", dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, help="folder for gpu_acceptance.json and .png "
                                                       "(default: benchmarks/results/gpu_acceptance-<date>)")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu_acceptance: needs one CUDA GPU with PyTorch and Triton: {problem}; nothing was run",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 comparisons are float32 (section a)
    torch.backends.cudnn.allow_tf32 = False
    out = args.out or HERE / "results" / f"gpu_acceptance-{datetime.date.today().isoformat()}"
    report = {"environment": environment(), "sections": {}, "seconds": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tidar-acceptance-") as workdir:
        context = {"workdir": workdir}
        if {"a", "d", "e", "g"} & set(args.sections):
            context["random_15b"] = _random_15b(Path(workdir) / "random-qwen2.5-1.5b")
        for letter in args.sections:
            began = time.perf_counter()
            try:
                result = SECTIONS[letter](context)
            except Exception as error:  # a crash is a failed section, reported with the rest
                result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            report["seconds"][letter] = round(time.perf_counter() - began, 1)
            report["sections"][letter] = result
            print(f"section {letter}: {'skipped' if result.get('skipped') else 'ok' if result.get('ok') else 'FAIL'} "
                  f"({report['seconds'][letter]} s)", flush=True)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    status = verdict(report)
    report["passed"] = status == 0
    write(out, report)
    print(f"wrote {out / 'gpu_acceptance.json'} and .png: {'PASS' if status == 0 else 'FAIL'}")
    return status


if __name__ == "__main__":
    sys.exit(main())

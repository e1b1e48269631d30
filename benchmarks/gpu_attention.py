"""GPU benchmarks of the hybrid-mask attention kernel (a script, not a test; needs CUDA).

    python benchmarks/gpu_attention.py attention -o OUT   # one attention call, kernel vs peers
    python benchmarks/gpu_attention.py forward -o OUT     # one model forward vs query tokens

attention: TiDAR decode steps (draft lengths 4, 8, 16) on the attention shapes of Qwen2.5-1.5B
(12 heads, 2 KV heads, head dim 128) and Qwen3-8B (32, 8, 128), past lengths 512..8192, batch 1
and 8, bf16: the Triton kernel (plugins/hybrid_attention.py) against FlexAttention with the
layout's mask_mod (torch.compile'd) and SDPA with the dense mask; the max error of the kernel
(and of Flex) against eager attention in fp32 over the dense mask.

forward: latency of one forward of a random-weight Qwen2.5-1.5B-shaped TiDARModel (bf16, KV
cache of --past tokens) as the query tokens grow 1..512 (a causal run: the "free token" curve
of docs/design.md §5), plus the TiDAR decode steps of --draft-lens, for each attention implementation.

Each writes OUT/<name>.json (device, date, versions, settings, results; median times in ms)
and OUT/<name>.png. Without CUDA the script exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

MODELS = {"qwen2.5-1.5b": dict(heads=12, kv_heads=2, head_dim=128),
          "qwen3-8b": dict(heads=32, kv_heads=8, head_dim=128)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- shared
def environment() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().astimezone().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "command": " ".join(sys.argv)}


def median_ms(fn, warmup: int, repeats: int) -> float:
    """Median time of `fn` in ms over CUDA events (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def write(out: Path, name: str, report: dict, plot) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plot(plt, report)
    figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / name}.json and .png")


# ---------------------------------------------------------------- attention
def attention_case(shape: dict, draft_len: int, past: int, batch: int, dtype: torch.dtype, flex, args) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask

    from tidar.plugins.hybrid_attention import hybrid_attention
    from tidar.runtime.layout import Layout
    from tidar.runtime.model import eager_attention

    layout = Layout.decode(draft_len)
    heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    new, kv_len, scale = layout.num_new, past + layout.num_new, shape["head_dim"] ** -0.5
    q = torch.randn(batch, heads, new, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, kv_len, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    past_lens = torch.full((batch,), past, device="cuda")
    dense = layout.dense_mask(past_lens, kv_len)[:, None]
    block_mask = create_block_mask(layout.mask_mod(past_lens), batch, None, new, kv_len, device="cuda")
    runs = {
        "triton": lambda: hybrid_attention(q, k, v, past_lens, **layout.kernel_scalars(), scale=scale),
        "flex": lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=True),
    }
    reference = eager_attention(q.float(), k.float(), v.float(), dense, scale)
    errors = {name: (runs[name]().float() - reference).abs().max().item() for name in ("triton", "flex")}
    del reference
    times = {name: median_ms(run, args.warmup, args.repeats) for name, run in runs.items()}
    return {"draft_len": draft_len, "new_tokens": new, "past": past, "batch": batch, "ms": times, "max_error": errors}


def run_attention(args) -> dict:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # One static compilation per shape (Flex at its fastest); the default limit of recompiles
    # would silently drop later shapes to the uncompiled path.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    flex = torch.compile(flex_attention, dynamic=False)
    results = []
    for model in args.models:
        for batch in args.batch:
            for draft_len in args.draft_lens:
                for past in args.past:
                    case = attention_case(MODELS[model], draft_len, past, batch, DTYPES[args.dtype], flex, args)
                    case["model"] = model
                    results.append(case)
                    print(json.dumps(case))
    return {**environment(), "benchmark": "attention", "dtype": args.dtype, "shapes": MODELS,
            "warmup": args.warmup, "repeats": args.repeats, "results": results}


def plot_attention(plt, report: dict):
    models = sorted({r["model"] for r in report["results"]})
    batches = sorted({r["batch"] for r in report["results"]})
    figure, axes = plt.subplots(len(models), len(batches), figsize=(6 * len(batches), 4 * len(models)), squeeze=False)
    styles = {4: ":", 8: "--", 16: "-"}
    for row, model in enumerate(models):
        for col, batch in enumerate(batches):
            ax = axes[row][col]
            cases = [r for r in report["results"] if r["model"] == model and r["batch"] == batch]
            for impl, color in (("triton", "C0"), ("flex", "C1"), ("sdpa", "C2")):
                for draft_len in sorted({r["draft_len"] for r in cases}):
                    points = sorted((r["past"], r["ms"][impl]) for r in cases if r["draft_len"] == draft_len)
                    ax.plot(*zip(*points), color=color, linestyle=styles.get(draft_len, "-."), marker="o",
                            markersize=3, label=f"{impl} b={draft_len}")
            ax.set(xscale="log", yscale="log", xlabel="past length", ylabel="ms",
                   title=f"{model}, batch {batch} ({report['dtype']})")
            ax.legend(fontsize=7)
    figure.suptitle(f"hybrid-mask attention, one call: {report['device']}")
    return figure


# ---------------------------------------------------------------- forward
def qwen25_15b_config():
    from tidar.runtime.config import TiDARConfig

    return TiDARConfig(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       mask_token_id=151662, block_size=16, tie_word_embeddings=True, torch_dtype="bfloat16")


def run_forward(args) -> dict:
    from tidar.runtime.layout import Layout
    from tidar.runtime.model import TiDARModel

    config = qwen25_15b_config()
    with torch.device("cuda"):
        model = TiDARModel(config)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model = model.to(DTYPES[args.dtype]).eval()
    layouts = [("causal", q, Layout.autoregressive(q)) for q in args.queries]
    layouts += [("decode", b, Layout.decode(b)) for b in args.draft_lens]
    results = []
    for batch in args.batch:
        cache = model.new_cache(batch, args.past + max(layout.num_new for *_, layout in layouts))
        cache.keys.normal_()
        cache.values.normal_()
        cache.lengths = [args.past] * batch  # device and host copies of the lengths
        for attention in args.attention:
            model.set_attention(attention)
            for kind, size, layout in layouts:
                ids = torch.randint(0, config.vocab_size, (batch, layout.num_new), device="cuda")
                with torch.no_grad():
                    ms = median_ms(lambda: model(ids, layout, cache), args.warmup, args.repeats)
                case = {"attention": attention, "batch": batch, "kind": kind, "size": size,
                        "query_tokens": layout.num_new, "ms": ms}
                results.append(case)
                print(json.dumps(case))
    return {**environment(), "benchmark": "forward", "model": "random Qwen2.5-1.5B-shaped TiDARModel",
            "dtype": args.dtype, "past": args.past, "warmup": args.warmup, "repeats": args.repeats,
            "results": results}


def plot_forward(plt, report: dict):
    batches = sorted({r["batch"] for r in report["results"]})
    figure, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        cases = [r for r in report["results"] if r["batch"] == batch]
        for index, attention in enumerate(dict.fromkeys(r["attention"] for r in cases)):
            mine = [r for r in cases if r["attention"] == attention]
            curve = sorted((r["query_tokens"], r["ms"]) for r in mine if r["kind"] == "causal")
            ax.plot(*zip(*curve), color=f"C{index}", marker="o", markersize=3, label=attention)
            steps = sorted((r["query_tokens"], r["ms"]) for r in mine if r["kind"] == "decode")
            if steps:
                ax.plot(*zip(*steps), color=f"C{index}", marker="*", markersize=9, linestyle="none")
        ax.set(xscale="log", xlabel="query tokens in the forward (stars: TiDAR decode steps)", ylabel="ms",
               title=f"batch {batch}, past {report['past']} ({report['dtype']})")
        ax.legend(fontsize=8)
    figure.suptitle(f"one forward of a 1.5B-shaped model: {report['device']}")
    return figure


# ---------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    attention = commands.add_parser("attention", help="one attention call: the kernel against Flex and SDPA")
    attention.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    attention.add_argument("--draft-lens", nargs="+", type=int, default=[4, 8, 16])
    attention.add_argument("--past", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    attention.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    forward = commands.add_parser("forward", help="one model forward as the query tokens grow")
    forward.add_argument("--queries", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    forward.add_argument("--draft-lens", nargs="+", type=int, default=[4, 8, 16])
    forward.add_argument("--past", type=int, default=1024)
    forward.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    forward.add_argument("--attention", nargs="+", default=["eager", "sdpa", "flex-compiled", "triton"])
    for command in (attention, forward):
        command.add_argument("-o", "--out", type=Path, required=True, help="folder for <name>.json and .png")
        command.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
        command.add_argument("--warmup", type=int, default=5)
        command.add_argument("--repeats", type=int, default=20)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured",
              file=sys.stderr)
        return 2
    if args.command == "attention":
        write(args.out, "attention", run_attention(args), plot_attention)
    else:
        write(args.out, "forward_latency", run_forward(args), plot_forward)
    return 0


if __name__ == "__main__":
    sys.exit(main())

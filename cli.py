"""The `tidar` command line: generate text, and write a random-weight tiny checkpoint to try things on.

    tidar generate MODEL --prompt TEXT [--max-new-tokens N] [--mode tidar|ar] [--draft-len B]
                   [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop S ...]
                   [--drafter tidar|hybrid|ngram] [--mask-token-id ID] [--block-size B]
                   [--backend NAME] [--attention IMPL] [--dtype D] [--device cpu|cuda[:N]]
                   [--cuda-graphs | --no-cuda-graphs] [--beta X] [--json]
    tidar init OUT [--family qwen2|qwen3|llama] [--block-size B] [--seed S]
    tidar calibrate MODEL [--prompts default|heldout|FILE] [--max-new-tokens N] [-o FILE]
    tidar train --files GLOB [GLOB ...] --out OUT [--init-from CHECKPOINT] [--steps N] [--self-distill F] ... [--resume]
    tidar serve REPO [--grpc-port P] [--http-port P] [--metrics-port P] [--max-restarts N]
                [--openai-port P [--openai-host ADDR] [--api-key KEY]] [-- COMMAND ...]
    tidar client [--url HOST:PORT] [--max-tokens N] [--no-stream] TEXT

Bad input exits with status 2 and one line on stderr that names the problem; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

USAGE_ERROR = 2


class CLIError(Exception):
    """A problem with the user's input, printed as one line."""


def _generate(args: argparse.Namespace) -> int:
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.backends.cuda_graphs import GRAPHABLE_ATTENTION
    from tidar.runtime.generate import DecodeEngine, Request
    from tidar.runtime.generation_config import GenerationDefaults
    from tidar.runtime.sampling import SamplingParams
    from tidar.runtime.tokenizer import Tokenizer

    if args.mode == "ar":
        if args.draft_len not in ("auto", "0"):
            raise CLIError("--draft-len applies to --mode tidar only (AR decoding drafts nothing)")
        draft_len: int | None = 0
    elif args.draft_len == "auto":
        draft_len = None
    else:
        try:
            draft_len = int(args.draft_len)
        except ValueError:
            raise CLIError(f"--draft-len must be an integer or 'auto', got {args.draft_len!r}") from None
        if draft_len < 1:
            raise CLIError(f"--draft-len must be at least 1 in tidar mode, got {draft_len} "
                           "(use --mode ar for AR decoding)")
    if args.mode == "ar" and args.drafter not in (None, "tidar"):
        raise CLIError(f"--drafter {args.drafter} applies to --mode tidar only (AR decoding drafts nothing)")
    draft_blocks = args.draft_blocks
    if draft_blocks is not None:
        if draft_len is None or draft_len == 0:
            raise CLIError("--draft-blocks needs a fixed --draft-len in tidar mode (auto chooses the blocks too)")
    defaults = GenerationDefaults.from_folder(args.model)  # generation_config.json: end ids, sampling defaults
    chosen = defaults.apply({"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k})
    sampling = SamplingParams(seed=args.seed, **{name: value for name, value in chosen.items() if value is not None})
    if args.prompt == "":
        raise CLIError("--prompt is empty: at least one token is needed")
    options = {"mask_token_id": args.mask_token_id, "block_size": args.block_size}
    if args.device != "cpu" or args.cuda_graphs is not None:
        if args.backend != "torch":
            raise CLIError("--device and --cuda-graphs are options of the torch backend")
        options["device"] = _torch_device(args.device)
        if args.cuda_graphs and options["device"].type != "cuda":
            raise CLIError(f"--cuda-graphs needs --device cuda (CUDA graphs are captured on a GPU), got --device "
                           f"{args.device}")
        options["cuda_graphs"] = args.cuda_graphs
        if args.cuda_graphs and args.attention not in GRAPHABLE_ATTENTION:
            raise CLIError(f"--cuda-graphs cannot capture --attention {args.attention}; use one of "
                           f"{', '.join(GRAPHABLE_ATTENTION)}")
    backend = load_backend(args.backend, args.model, dtype=args.dtype, attention=args.attention, **options)
    tokenizer = Tokenizer(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    request = Request(prompt_ids, args.max_new_tokens, sampling, stop=tuple(args.stop or ()), eos_ids=defaults.eos_ids)
    # a bad request or --beta fails before the draft shape is measured
    DecodeEngine(backend, tokenizer, draft_len=0, beta=args.beta).check(request)
    policy = None
    if draft_len is None:
        choice = _auto_draft_choice(backend, tokenizer, args.model)
        (draft_len, draft_blocks), policy = choice.shape, choice.policy
    else:
        from tidar.runtime.draft_shape import DraftShapeError, validate_draft_shape

        try:
            validate_draft_shape(backend.config, draft_len, draft_blocks, names=("--draft-len", "--draft-blocks"))
        except DraftShapeError as error:
            raise CLIError(str(error)) from None
    from tidar.runtime.ngram import DEFAULT_DRAFTER

    drafter = args.drafter or (DEFAULT_DRAFTER if draft_len else "tidar")  # AR drafts nothing
    verify_only = policy is not None and drafter != "tidar"  # auto: verify-only steps too (design §3.10)
    engine = DecodeEngine(backend, tokenizer, draft_len=draft_len, beta=args.beta, draft_blocks=draft_blocks,
                          drafter=drafter, verify_only=verify_only, shape_policy=policy if verify_only else None)
    started = time.perf_counter()
    result = None
    for deltas in engine.stream([request]):
        for delta in deltas:
            if not args.json:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            if delta.result is not None:
                result = delta.result
    seconds = time.perf_counter() - started
    stats = result.stats
    if args.json:
        print(json.dumps({
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": result.finish_reason,
            "forward_passes": stats.forward_passes,
            "tokens_per_forward": round(result.tokens_per_forward, 4),
            "tokens_per_second": round(len(result.token_ids) / seconds, 2) if seconds > 0 else None,
            "seconds": round(seconds, 4),
            "mode": args.mode,
            "backend": args.backend,
            "draft_len": engine.draft_len,
            "draft_blocks": engine.draft_blocks,
            "draft_tokens": stats.draft_tokens,
            "accepted_tokens": stats.accepted_tokens,
            "accepted_per_position": stats.accepted_per_position,
            "drafter": engine.drafter,
            "drafts_by_source": stats.drafts_by_source,
            "proposed_by_source": stats.proposed_by_source,
            "accepted_by_source": stats.accepted_by_source,
        }))
    else:
        print()
        print(f"[{len(result.token_ids)} tokens, {stats.forward_passes} forwards, "
              f"{result.tokens_per_forward:.2f} tokens/forward, {len(result.token_ids) / seconds:.1f} tokens/s, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def _torch_device(name: str):
    """The torch device `--device` names, checked to exist on this machine."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise CLIError(f"--device {name}: no such CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: the torch backend runs on cpu or cuda")
    return device


def _auto_draft_choice(backend, tokenizer, model: str):
    """The autotuner's choice: the draft shape (b, k) with the best expected tokens/s on this
    machine (may be AR, when drafting does not pay, as with random weights), by a race of whole
    decode steps, replayed tokens per step where MODEL/acceptance.json has them, else the start-up
    estimate (said on stderr); its step seconds value verify-only steps as it decodes."""
    from tidar.runtime import autotune
    from tidar.runtime.calibrate import startup_estimate

    acceptance, replayed, source = startup_estimate(backend, tokenizer, model, budget_s=30.0)
    print(f"draft shape: expected tokens per step from {source}", file=sys.stderr)
    return autotune.choose_draft_len(backend, acceptance, replayed=replayed, tokenizer=tokenizer, budget_s=30.0)


def _calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.calibrate import CalibrationError, calibrate, prompt_ids, write_acceptance
    from tidar.runtime.tokenizer import Tokenizer

    model = Path(args.model)
    out = Path(args.out) if args.out else model / "acceptance.json"
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not out.parent.is_dir():
        raise CLIError(f"-o {out}: folder {out.parent} does not exist")
    backend = load_backend(args.backend, model, dtype="float32" if args.backend == "torch" else None,
                           **({"attention": "sdpa"} if args.backend == "torch" else {}))
    tokenizer = Tokenizer(model)
    try:
        prompts = prompt_ids(args.prompts, model, tokenizer, args.count)
        result = calibrate(backend, prompts, args.max_new_tokens, args.draft_lens,
                           progress=lambda items: tqdm(items, desc="calibrating (greedy replay)", unit="prompt",
                                                       file=sys.stderr))
    except CalibrationError as exc:
        raise CLIError(str(exc)) from None
    path = write_acceptance(out, result, "tidar calibrate", prompt_set=args.prompts if args.prompts in
                            ("default", "heldout") else Path(args.prompts).name, backend=args.backend)
    b = max(result.draft_lens)
    print(f"{result.prompts} prompts x {result.max_new_tokens} tokens in {result.seconds:.1f} s: P(d1) = "
          f"{result.acceptance[0] if result.acceptance else 0.0:.3f}, b{b}k{b} commits "
          f"{result.replayed.get(f'b{b}k{b}', 1.0):.2f} tokens/step; written to {path}", file=sys.stderr)
    return 0


def _bench_onnxruntime(reference, out: Path):
    """`tidar bench --backend onnxruntime`: the standard graph of the reference's fp32 weights,
    exported into OUT/onnx, with torch's thread count."""
    import torch

    from tidar.export.onnx_export import onnxruntime_backend

    return onnxruntime_backend(reference.model, out / "onnx", threads=torch.get_num_threads())


def _bench(args: argparse.Namespace) -> int:
    from tidar.runtime.bench import bench, table

    if not args.no_peers:
        try:
            import transformers  # noqa: F401  (the peers run on it)
        except ImportError:
            raise CLIError("the transformers peers need `pip install transformers` (or pass --no-peers)") from None

    factory = _bench_onnxruntime if args.backend == "onnxruntime" else None
    report = bench(args.model, args.out, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                   max_new_tokens=args.max_new_tokens, repeats=args.repeats, draft_lens=tuple(args.draft_lens),
                   peers=not args.no_peers, write_acceptance=args.write_acceptance,
                   progress=lambda name: print(f"running {name}", file=sys.stderr),
                   draft_blocks=tuple(args.draft_blocks), backend_factory=factory)
    print(table(report))
    chosen = report["chosen_shape"]
    print(f"\nchosen shape: b = {chosen['draft_len']}, k = {chosen['draft_blocks']} "
          f"({chosen['query_tokens']} query tokens per step and row)")
    print(f"\n{report['date']}, {report['machine']}, {report['backend']}, torch {report['torch']}, "
          f"{report['threads']} threads; "
          f"{report['prompts']} prompts x {report['max_new_tokens']} new tokens; "
          f"written to {Path(args.out) / 'bench.json'} and bench.png")
    return 0


def _init(args: argparse.Namespace) -> int:
    from tidar.train.checkpoint import write_random_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"{out}: exists and is not empty")
    write_random_checkpoint(out, args.family, block_size=args.block_size, seed=args.seed)
    print(f"wrote a random-weight tiny {args.family} TiDAR checkpoint (block size {args.block_size}) to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tidar.train.trainer import Trainer, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    try:
        trainer = Trainer(config, resume=args.resume)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"training on {trainer.split['train_files']} files ({trainer.split['train_tokens']} tokens), "
          f"held out {trainer.split['heldout_files']} files ({trainer.split['heldout_tokens']} tokens); "
          f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters", file=sys.stderr)
    trainer.run()
    print(f"checkpoint: {config.out}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tidar.serving.serve import API_KEY_ENV, ServeError, serve
    from tidar.serving.supervisor import RestartPolicy

    if args.ready_timeout is not None and not args.ready_timeout > 0:
        raise CLIError(f"--ready-timeout must be a positive number of seconds, got {args.ready_timeout}")
    if min(args.max_restarts, args.restart_backoff, args.stable_after) < 0:
        raise CLIError(f"--max-restarts, --restart-backoff and --stable-after must be >= 0, got "
                       f"{args.max_restarts}, {args.restart_backoff} and {args.stable_after}")

    if args.api_key is not None and (args.openai_port is None or not args.api_key):
        raise CLIError("--api-key protects the OpenAI front: give a non-empty key, and --openai-port")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        policy = RestartPolicy(max_restarts=args.max_restarts, backoff=args.restart_backoff,
                               stable_after=args.stable_after)
        return serve(args.repo, args.grpc_port, args.http_port, args.metrics_port,
                     command=args.command_after or None, verbose=args.verbose, policy=policy,
                     openai_port=args.openai_port, openai_host=args.openai_host, api_key=api_key,
                     **({} if args.ready_timeout is None else {"ready_timeout": args.ready_timeout}))
    except ServeError as exc:
        raise CLIError(str(exc)) from None
    except FileNotFoundError as exc:
        raise CLIError(f"cannot run the command after --: {exc.strerror}: {exc.filename}") from None


def _client(args: argparse.Namespace) -> int:
    from tidar.serving.client import ClientError, request

    top_p = args.top_p
    if args.temperature and top_p is None and args.top_k is None:
        top_p = 1.0  # a temperature alone is greedy in tensorrtllm_backend's contract (serving/wire.py)
    options = dict(temperature=args.temperature, top_p=top_p, top_k=args.top_k, seed=args.seed,
                   stop_words=args.stop, mode=args.mode, draft_len=args.draft_len, timeout=args.timeout)
    printer = None if (args.json or args.no_stream) else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    try:
        result = request(args.url, args.text, args.max_tokens, stream=not args.no_stream, on_text=printer,
                         model=args.model_name, **options)
    except ClientError as exc:
        raise CLIError(f"the server refused the request: {exc}") from None
    except ModuleNotFoundError:
        raise
    except Exception as exc:  # connection problems from grpc / tritonclient
        raise CLIError(f"cannot reach a tidar model at {args.url}: {exc}") from None
    summary = {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
               "tokens": len(result.token_ids), "forward_passes": result.forward_passes,
               "tokens_per_forward": round(result.tokens_per_forward, 4),
               "tokens_per_second": round(result.tokens_per_second, 2),
               "time_to_first_token": round(result.time_to_first_token or 0.0, 4),
               "draft_tokens": result.draft_tokens, "accepted_draft_tokens": result.accepted_draft_tokens}
    if args.json:
        print(json.dumps(summary))
        return 0
    if args.no_stream:
        sys.stdout.write(result.text)
    print(f"\n[{summary['tokens']} tokens in {result.seconds:.2f} s: {summary['tokens_per_second']} tokens/s, "
          f"T/NFE {summary['tokens_per_forward']} ({result.forward_passes} forwards), accepted drafts "
          f"{result.accepted_draft_tokens}/{result.draft_tokens}, finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (--files and --out required), typed from its default."""
    from tidar.train.trainer import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "files":
            parser.add_argument(flag, nargs="+", required=True,
                                help="glob patterns of the text corpus ('stdlib': Python's standard library)")
        elif f.name == "out":
            parser.add_argument("-o", flag, required=True, help="output folder")
        elif isinstance(f.default, bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                                help=f"true/false (default {f.default})")
        else:
            kind = type(f.default) if f.default is not None else str
            if f.name == "threads":
                kind = int
            parser.add_argument(flag, type=kind, default=None, help=f"default {f.default}")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidar", description="TiDAR runtime: generate text with the "
                                     "draft-verify loop of a TiDAR model.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation of a prompt",
                         description="Generate a continuation of --prompt with TiDAR (drafting by one-step "
                                     "diffusion, verifying autoregressively) or with plain AR decoding. "
                                     "Text streams to stdout as it is committed; statistics go to stderr.")
    gen.add_argument("model", nargs="?", default=None,
                     help="TiDAR checkpoint folder (config.json + safetensors + tokenizer.json); "
                          "default: the bundled model in models/")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="upper bound on generated tokens (default 64)")
    gen.add_argument("--mode", choices=("tidar", "ar"), default="tidar", help="decoding mode (default tidar)")
    gen.add_argument("--draft-len", default="auto",
                     help="draft length b in 1..block_size, or 'auto' (default): the length with the best "
                          "expected tokens/s from this machine's measured step latency and the model's "
                          "acceptance (MODEL/acceptance.json, written by `tidar bench --write-acceptance`, "
                          "else a short calibration run); auto may choose 0 (AR) when drafting does not pay, "
                          "and chooses the mask blocks k too")
    gen.add_argument("--draft-blocks", type=int, default=None,
                     help="mask blocks k in 1..draft length (default: k = the draft length, the paper's step of "
                          "b(b+1) query tokens); k < b pre-drafts only the outcomes 'up to k tokens committed' "
                          "(b + k*b query tokens), still lossless")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 = greedy; > 0 samples (default: the checkpoint's generation_config.json, else 0)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling mass in (0, 1] (default: the checkpoint's generation_config.json, "
                          "else 1)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="keep the k likeliest tokens; 0 = all (default: the checkpoint's generation_config.json, "
                          "else 0)")
    gen.add_argument("--seed", type=int, default=None,
                     help="random seed for sampling; the same seed and the same --draft-len give the same output "
                          "(with --draft-len auto the chosen length, and so the random stream, may vary)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable); the text ends before it")
    from tidar.runtime.config import add_layout_options

    add_layout_options(gen)
    gen.add_argument("--beta", type=float, default=1.0,
                     help="weight of AR logits in verification; 1 (default) is lossless")
    gen.add_argument("--backend", default="torch", help="executor (default torch)")
    gen.add_argument("--attention", default="eager", choices=("eager", "sdpa", "flex", "flex-compiled", "triton"),
                     help="attention implementation of the torch backend (default eager; triton = the "
                          "hybrid-mask kernel of tidar.plugins, on CUDA)")
    gen.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="compute dtype (default: the checkpoint's)")
    gen.add_argument("--device", default="cpu", help="device of the torch backend: cpu (default), cuda, cuda:N")
    gen.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="run the torch backend's decode steps as CUDA graphs, one per (batch bucket, draft "
                          "length), captured on first use (default: on with --device cuda and eager, sdpa or "
                          "triton attention)")
    from tidar.runtime.ngram import DRAFTERS

    gen.add_argument("--drafter", choices=DRAFTERS, default=None,
                     help="where each step's proposals come from: tidar, TiDAR's pre-drafted block; hybrid "
                          "(default), TiDAR's block or a continuation found earlier in the prompt and output "
                          "(prompt lookup), whichever is expected to commit more; ngram, the continuation whenever one "
                          "matches (docs/design.md §3.9). Output is the same: greedy equals AR, a seed gives the "
                          "same text")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the output and statistics")
    gen.set_defaults(run=_generate)

    init = sub.add_parser("init", help="write a random-weight tiny TiDAR checkpoint",
                          description="Write a random-weight tiny TiDAR checkpoint with a real byte-level BPE "
                                      "tokenizer (trained on the Python standard library's source), so every "
                                      "command can be tried before a trained model exists.")
    init.add_argument("out", help="folder to create")
    init.add_argument("--family", choices=("qwen2", "qwen3", "llama"), default="qwen2")
    init.add_argument("--block-size", type=int, default=16, help="block size b of the model (default 16)")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    init.set_defaults(run=_init)

    ben = sub.add_parser("bench", help="benchmark TiDAR against AR and its peers",
                         description="Greedy decoding of held-out prompts by AR (this runtime), TiDAR at several "
                                     "draft lengths and at the autotuned one, transformers generate() and its "
                                     "prompt-lookup speculation; tokens/s, T/NFE, step latency, acceptance per "
                                     "position and an equal-to-AR check. Writes bench.json and bench.png.")
    ben.add_argument("model", nargs="?", default=None, help="TiDAR checkpoint folder (default: the bundled model)")
    ben.add_argument("-o", "--out", default="bench-out", help="output folder (default bench-out)")
    ben.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    ben.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    ben.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    ben.add_argument("--repeats", type=int, default=3, help="runs per prompt; the median counts (default 3)")
    ben.add_argument("--draft-lens", type=int, nargs="+", default=[4, 8, 16], help="TiDAR draft lengths")
    ben.add_argument("--draft-blocks", type=int, nargs="*", default=[1, 2],
                     help="mask block counts k run below k = b for each draft length, and tried by the "
                          "autotuner for every b (default 1 2; none: k = b only)")
    ben.add_argument("--no-peers", action="store_true", help="skip the transformers peers")
    ben.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                     help="backend of this runtime's methods (default torch; onnxruntime exports the standard "
                          "graph of the same fp32 weights into OUT/onnx first); the peers run on torch")
    ben.add_argument("--write-acceptance", action="store_true",
                     help="store the measured acceptance and the replayed tokens per step of every draft shape "
                          "in MODEL/acceptance.json for the draft-shape autotuner")
    ben.set_defaults(run=_bench)

    cal = sub.add_parser("calibrate", help="measure a checkpoint's acceptance for the draft-shape autotuner",
                         description="Greedy replay of a prompt set through MODEL (a checkpoint or a `tidar-export "
                                     "build` output): the acceptance and the tokens per step of every trained draft "
                                     "shape (b, k), written to acceptance.json beside the model, where `tidar "
                                     "generate --draft-len auto` and `tidar serve` read them (an export copies "
                                     "the checkpoint's).")
    cal.add_argument("model", help="checkpoint folder or export output folder")
    cal.add_argument("--prompts", default="default",
                     help="prompt set: default (shipped with tidar: code, prose, instructions), heldout (the held-out "
                          "split of the model's train_config.json) or a file (a JSON list of strings, or JSON Lines "
                          "of strings or {\"prompt\": ...} objects)")
    cal.add_argument("--count", type=int, default=None, help="use at most this many prompts (default all; heldout 8)")
    cal.add_argument("--max-new-tokens", type=int, default=64, help="tokens replayed per prompt (default 64)")
    cal.add_argument("--draft-lens", type=int, nargs="+", default=None,
                     help="draft lengths b to replay, each with k = 1..b (default: the trained ones)")
    cal.add_argument("--backend", default="torch", help="executor: torch (default) or onnxruntime (an export)")
    cal.add_argument("-o", "--out", default=None, help="file to write (default MODEL/acceptance.json)")
    cal.set_defaults(run=_calibrate)

    train = sub.add_parser("train", help="train a TiDAR model with the full-mask objective",
                           description="Train (or convert an AR checkpoint into) a TiDAR model with the full-mask "
                                       "objective on plain-text files; resumable, with held-out AR and diffusion "
                                       "losses and a loss-curve PNG in the output folder. --self-distill F trains "
                                       "the drafts on the model's own greedy rollouts (a share F of each batch); "
                                       "under torchrun it trains data-parallel (DDP).")
    _add_train_options(train)
    train.set_defaults(run=_train)

    srv = sub.add_parser("serve", help="run Triton Inference Server on a model repository",
                         description="Run Triton Inference Server (the `tritonserver` on PATH, or the one bundled "
                                     "in nvidia-pytriton) on REPO, the repository `tidar-export build` writes to "
                                     "OUT/triton_repo; print the endpoints once every model is ready and serve "
                                     "until SIGINT/SIGTERM. With a COMMAND after `--`, run it once the server is "
                                     "ready (TIDAR_GRPC_URL and TIDAR_METRICS_URL set), then stop the server and "
                                     "exit with the command's status. The server is supervised: when a model "
                                     "process or tritonserver dies, the fault is logged, the server is killed "
                                     "(in-flight requests end with UNAVAILABLE) and restarted with backoff.")
    srv.add_argument("repo", help="rendered model repository (OUT/triton_repo)")
    srv.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 = any free port)")
    srv.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 = any free port)")
    srv.add_argument("--metrics-port", type=int, default=8002,
                     help="Prometheus metrics port (default 8002; 0 = any free port)")
    srv.add_argument("--max-restarts", type=int, default=5,
                     help="restarts in a row after a dead model process or server before giving up with exit "
                          "status 1 (default 5; 0 = exit 1 on the first fault)")
    srv.add_argument("--restart-backoff", type=float, default=1.0,
                     help="seconds before the first restart of a row, doubled for each further one, at most "
                          "30 (default 1)")
    srv.add_argument("--openai-port", type=int, default=None,
                     help="also serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                          "/v1/models) on this port (0 = any free port); needs the openai extra")
    srv.add_argument("--openai-host", default="0.0.0.0",
                     help="address the OpenAI front binds (default 0.0.0.0: every interface; 127.0.0.1: this "
                          "machine only)")
    srv.add_argument("--api-key", default=None,
                     help="API key of the OpenAI front: every /v1 route, /v1/models included, then needs "
                          "'Authorization: Bearer KEY' and answers 401 otherwise, as vLLM's --api-key (default: "
                          "the TIDAR_API_KEY environment variable; neither: no key)")
    srv.add_argument("--stable-after", type=float, default=60.0,
                     help="seconds of serving after which a fault starts a new row of restarts (default 60)")
    srv.add_argument("--ready-timeout", type=float, default=None,
                     help="seconds to wait for every model to load and finish its start-up autotune before giving "
                          "up (default 900; the models print their progress meanwhile)")
    srv.add_argument("--verbose", action="store_true", help="verbose server log")
    srv.set_defaults(run=_serve)

    cli = sub.add_parser("client", help="send a prompt to a served tidar model (gRPC, streaming)",
                         description="Send TEXT to the `tidar` model of a Triton server over gRPC, print the "
                                     "text as it streams in, then a stats line on stderr (tokens, tokens/s, "
                                     "T/NFE, accepted drafts, finish reason).")
    cli.add_argument("text", help="prompt text")
    cli.add_argument("--url", default=os.environ.get("TIDAR_GRPC_URL", "localhost:8001"),
                     help="server gRPC address (default $TIDAR_GRPC_URL or localhost:8001)")
    cli.add_argument("--max-tokens", type=int, default=64, help="upper bound on generated tokens (default 64)")
    cli.add_argument("--no-stream", action="store_true", help="one response with the whole output")
    cli.add_argument("--mode", choices=("tidar", "ar"), default=None, help="decoding mode (server default tidar)")
    cli.add_argument("--draft-len", type=int, default=None, help="fixed draft length (default: the server's)")
    cli.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    cli.add_argument("--top-p", type=float, default=None)
    cli.add_argument("--top-k", type=int, default=None)
    cli.add_argument("--seed", type=int, default=None)
    cli.add_argument("--stop", action="append", help="stop string (repeatable)")
    cli.add_argument("--timeout", type=float, default=None, help="seconds before the server ends the request")
    cli.add_argument("--model-name", default="tidar", help="Triton model name (default tidar)")
    cli.add_argument("--json", action="store_true", help="print one JSON object with the output and statistics")
    cli.set_defaults(run=_client)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_after = []
    if argv[:1] == ["serve"] and "--" in argv:  # `tidar serve REPO [options] -- COMMAND ...`
        split = argv.index("--")
        argv, command_after = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    args.command_after = command_after
    from tidar.runtime.checkpoint import CheckpointError
    from tidar.runtime.config import ConfigError

    from tidar.runtime.generate import RequestError
    from tidar.runtime.generation_config import GenerationConfigError
    from tidar.runtime.sampling import SamplingError
    from tidar.runtime.tokenizer import TokenizerError

    if getattr(args, "model", "") is None:
        from tidar import BUNDLED_MODEL

        args.model = str(BUNDLED_MODEL)
    try:
        return args.run(args)
    except (CLIError, CheckpointError, ConfigError, GenerationConfigError, RequestError, SamplingError,
            TokenizerError) as exc:
        print(f"tidar {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except ModuleNotFoundError as exc:
        from tidar.runtime.extras import explain_missing

        return explain_missing(exc, f"tidar {args.command}")
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

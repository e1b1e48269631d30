"""The `tidar-export` command line: build an export folder from a checkpoint, and verify one.

    tidar-export build [CHECKPOINT] -o OUT [--tp N] [--dtype D] [--draft-len B] [--draft-blocks K]
                       [--mask-token-id ID] [--block-size B] [--engine auto|skip|require] [--force] [--quiet]
    tidar-export verify OUT [--json] [--threads N]

Bad input exits with status 2 and one line `tidar-export CMD: error: ...` on stderr, no
traceback; a verify that finds a mismatch exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..runtime.config import add_layout_options, non_negative_int

USAGE_ERROR = 2
VERIFY_FAILED = 1

BUILD_DESCRIPTION = """\
Export a TiDAR checkpoint (config.json + safetensors + tokenizer.json) into OUT, a folder with
everything needed to serve it. The checkpoint is validated first (every tensor present, with
the right shape, finite; config and weights consistent; the tokenizer fits the model); nothing
is written if it is not valid. Every step streams the checkpoint a tensor at a time, so memory
stays well below the checkpoint's size. OUT is written atomically: the build happens in a temporary
sibling folder (.OUT.partial-*) that becomes OUT only once complete, so a failed build leaves
no OUT behind.

Checkpoints: this project's (config.json with a `tidar` block), and the released TiDAR-LM models
as downloaded (architectures TiDARForCausalLM / TiDARSmallForCausalLM, no `tidar` block: [MASK] is
the tokenizer's <|fim_pad|>, the block size 16). --mask-token-id and --block-size supply or
override the two fields for any checkpoint. OUT's config.json and manifest.json record the
resolved fields and where each came from, so nothing after the build needs the flags.

OUT holds:
  config.json, tokenizer.json, tokenizer_config.json, generation_config.json
                         from the checkpoint (config.json with the resolved `tidar` block): OUT
                         is itself a model folder, e.g. `tidar generate OUT --backend onnxruntime`
  trtllm/                TensorRT-LLM checkpoint: config.json + rank{r}.safetensors per
                         tensor-parallel rank (input of trtllm-build)
  trtllm/build_engine.sh the trtllm-build command (TensorRT-LLM 1.2.x) for a GPU host
  onnx/decode_step.onnx  one decode step (any layout: prefill, TiDAR step, AR step), standard
                         ONNX ops, runs in ONNX Runtime (float32)
  onnx/decode_step_plugin.onnx
                         the same step with one tidar::hybrid_attention node per layer (the
                         TensorRT plugin's contract)
  onnx/decode_step.weights
                         the weights both graphs read (ONNX external data, float32)
  engine/                the TensorRT-LLM engine (config.json, rank{r}.engine), only where
                         TensorRT-LLM 1.2.x could build one
  tensorrt/decode_step.engine
                         the TensorRT engine of the plugin graph, only where TensorRT, the
                         plugin and a GPU are available
  triton_repo/           the Triton model repository (`tidar serve OUT/triton_repo`)
  manifest.json          inputs and their sha256, library versions, options, every
                         artifact's size and sha256, skipped steps and why
"""

VERIFY_DESCRIPTION = """\
Re-check every artifact of a `tidar-export build` output against manifest.json and the
reference: each file's sha256; the TensorRT-LLM rank files reassemble into exactly the source
checkpoint's tensors; ONNX Runtime's logits equal the PyTorch reference model's within 1e-4 and
greedy decoding gives identical tokens (AR, every trained block size, and the largest with k = 4
mask blocks); the plugin graph is valid ONNX; a TensorRT engine, where one was built and TensorRT
and a GPU are here, gives identical greedy tokens too. Steps the build skipped are reported with the build's reason. If the
source checkpoint no longer exists, artifacts are checked against the manifest's hashes only.
Prints one line per check; exits 1 if any check fails.
"""


def _build(args: argparse.Namespace) -> int:
    from .build import build

    manifest = build(args.checkpoint, args.out, tp=args.tp, dtype=args.dtype, draft_len=args.draft_len,
                     engine=args.engine, force=args.force, progress=not args.quiet, draft_blocks=args.draft_blocks,
                     mask_token_id=args.mask_token_id, block_size=args.block_size)
    files = manifest["artifacts"]
    print(f"wrote {args.out}: {len(files)} files, {sum(f['size'] for f in files):,} bytes "
          f"({', '.join(manifest['built'])})")
    for entry in manifest["skipped"]:
        print(f"skipped {entry['step']}: {entry['reason']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.out, threads=args.threads)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for check in report["checks"]:
            print(f"{check['status']:<8} {check['name']}: {check['detail']}")
    if not report["ok"]:
        failed = [c["name"] for c in report["checks"] if c["status"] == "failed"]
        print(f"tidar-export verify: FAILED: {len(failed)} check(s): {', '.join(failed)}", file=sys.stderr)
        return VERIFY_FAILED
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidar-export", description="Export a TiDAR checkpoint for "
                                     "deployment (TensorRT-LLM, ONNX, Triton) and verify the result.")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="export a checkpoint into an output folder",
                           description=BUILD_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("checkpoint", nargs="?", default=None,
                       help="TiDAR checkpoint folder (default: the bundled model in models/)")
    build.add_argument("-o", "--out", required=True, help="output folder to create (must not exist unless --force)")
    build.add_argument("--tp", type=non_negative_int, default=1,
                       help="tensor-parallel size of the TensorRT-LLM checkpoint: 1, 2, 4 or 8 (default 1)")
    build.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="dtype of the TensorRT-LLM checkpoint and engine (default: the checkpoint's); "
                            "the ONNX graphs are float32")
    build.add_argument("--draft-len", type=non_negative_int, default=None,
                       help="draft length the engine is sized for, 0..block_size (default: the block size)")
    build.add_argument("--draft-blocks", type=non_negative_int, default=None,
                       help="mask blocks k of the decode step the engine is sized for, 1..draft length "
                            "(b + k*b tokens per row; default: k = the draft length)")
    add_layout_options(build)
    build.add_argument("--engine", choices=("auto", "skip", "require"), default="auto",
                       help="auto (default): build the engines (TensorRT-LLM; TensorRT from the plugin graph) "
                            "where their libraries and a GPU are available, else record why not; skip: do not "
                            "try; require: fail (leaving nothing) if either cannot be built")
    build.add_argument("--force", action="store_true",
                       help="replace an existing OUT (a previous export), once the new one is complete")
    build.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    build.set_defaults(run=_build)

    check = sub.add_parser("verify", help="re-check an output folder against its manifest and the reference",
                           description=VERIFY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("out", help="output folder of `tidar-export build`")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    check.add_argument("--threads", type=non_negative_int, default=0,
                       help="ONNX Runtime intra-op threads (default 0: its own choice)")
    check.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tidar.runtime.checkpoint import CheckpointError
    from tidar.runtime.config import ConfigError
    from tidar.runtime.tokenizer import TokenizerError

    from .build import ExportError
    from .trtllm_checkpoint import ConversionError
    from .verify import VerifyError

    if getattr(args, "checkpoint", "") is None:
        from tidar import BUNDLED_MODEL

        args.checkpoint = str(BUNDLED_MODEL)
    try:
        return args.run(args)
    except (CheckpointError, ConfigError, TokenizerError, ExportError, ConversionError,
            VerifyError) as exc:
        print(f"tidar-export {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except ModuleNotFoundError as exc:
        from tidar.runtime.extras import explain_missing

        return explain_missing(exc, f"tidar-export {args.command}")
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

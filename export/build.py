"""`tidar-export build`: one checkpoint in, one self-describing export folder out.

    build(checkpoint, out, tp=1, dtype=None, draft_len=None, engine="auto", force=False,
          draft_blocks=None, mask_token_id=None, block_size=None) -> manifest

Steps, in order (each is an existing function; this module only sequences and records them):

1. validate   the checkpoint, before anything is written: config.json, every tensor present with
              the right shape and dtype and finite, config and weights consistent
              (`export.source.CheckpointSource`: headers first, then each tensor read in row
              chunks; the model is never materialised); tokenizer.json readable, its vocabulary no
              larger than config.json's and holding the mask id; pickle-only weights refused. The
              options are checked too (tp against the heads, dtype, draft length, the engine request).
2. copy       config.json and the tokenizer files, so OUT is itself a model folder the runtime
              opens (`tidar generate OUT --backend onnxruntime`). OUT's config.json is the
              checkpoint's with the resolved `tidar` block (mask id, block size, trained block
              sizes, and where they came from when not from the config: a released TiDAR-LM
              checkpoint's inferred fields, or --mask-token-id / --block-size), so every later step
              (`generate`, `serve`, `verify`, the engines) reads them with no flag;
              generation_config.json (end ids, sampling defaults) is copied as it is.
3. trtllm/    the TensorRT-LLM checkpoint (`export.trtllm_checkpoint.convert`) and
              `build_engine.sh`, the exact `trtllm-build` command for a GPU host.
4. onnx/      `decode_step.onnx` (standard lowering, runs in ONNX Runtime) and
              `decode_step_plugin.onnx` (tidar::hybrid_attention nodes, the TensorRT plugin's
              contract), which end at the final-norm hidden states, and `lm_head.onnx` (hidden
              states of the rows the runtime picks -> float32 logits), all float32, traced
              without weights and sharing one external-data file `decode_step.weights` written
              tensor by tensor from the checkpoint (`export.onnx_export.export_decode_steps`).
5. engine/    the TensorRT-LLM engine (config.json + rank{r}.engine), built per rank through
              TensorRT-LLM's Python API from `export/trtllm_model.py` where TensorRT-LLM 1.2.x is
              importable, and tensorrt/decode_step.engine, the TensorRT engine of the plugin ONNX
              graph (`export/tensorrt_engine.py`) where TensorRT and a GPU are. Each one that cannot
              be built, or whose build fails, is recorded as skipped with the reason
              (engine="auto"), or the build fails with the reasons (engine="require").
6. triton_repo/  the Triton Inference Server repository rendered from triton_repo/
              (`tidar.serving.repository`), serving OUT on the TensorRT engine, else the TensorRT-LLM
              engine, else ONNX Runtime, with the engine's batch limit (`render_triton`);
              `tidar serve OUT/triton_repo` runs it.
7. manifest.json  inputs and their sha256, library versions, options, every artifact's size and
              sha256, skipped steps and why, the TiDAR config summary, and the resolved TiDAR
              fields with their sources (`tidar`).

Memory: every step streams the checkpoint (one tensor, or a chunk of its rows, at a time), so
the build's peak memory is about the traced graph plus the largest tensor, not the model.

Atomicity: everything is written into a temporary sibling folder `.OUT.partial-<random>` that is
renamed to OUT only once complete, and removed on any failure, so no OUT that looks valid is ever
left behind. An existing OUT is refused unless `force`; then it is replaced only after the new one
is complete, and only if it is itself an export (has manifest.json) or empty.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import secrets
import shutil
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterator

import tidar
from tidar.runtime.checkpoint import CheckpointError, weight_files
from tidar.runtime.backends import base as artifacts
from tidar.runtime.config import ConfigError, TiDARConfig
from tidar.runtime.generation_config import GenerationConfigError, GenerationDefaults
from tidar.runtime.layout import Layout, check_draft_shape
from tidar.runtime.tokenizer import Tokenizer, TokenizerError

from .engine_shapes import engine_limits, recorded_batch_limit, serving_batch_sizes
from .source import CheckpointSource
from tidar.serving.options import ServingOptions
from tidar.serving.repository import render_repository
from .trtllm_checkpoint import DTYPES, ConversionError, convert, trtllm_config

ENGINE_MODES = ("auto", "skip", "require")
MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_FILE = "generation_config.json"
MODEL_FILES = (*TOKENIZER_FILES, GENERATION_FILE, "acceptance.json")
"""Files copied from the checkpoint into OUT when present (tokenizer.json always is); config.json
is written with the resolved `tidar` block (`write_config`)."""
ONNX_GRAPHS = {"standard": artifacts.STEP_GRAPH, "plugin": "onnx/decode_step_plugin.onnx"}
ONNX_HEAD = artifacts.HEAD_GRAPH
"""The LM-head graph (where the runtime's onnxruntime and tensorrt backends look)."""
ONNX_WEIGHTS = "onnx/decode_step.weights"
"""The external-data file every ONNX graph reads its weights from."""
ONNX_DTYPE = "float32"  # ONNX Runtime's CPU provider has no bfloat16 kernels; the graphs are the fp32 reference
VERSIONED_PACKAGES = ("torch", "safetensors", "tokenizers", "onnx", "onnxruntime", "onnxscript", "triton", "tensorrt",
                      "tensorrt_llm")

# The engine (TensorRT-LLM 1.2.x, the last release with the `trtllm-build` engine flow).
TRTLLM_MODEL_CLASS = "TiDARForCausalLM"
TRTLLM_MODEL_FILE = "export/trtllm_model.py"
"""Where the TensorRT-LLM model definition of TiDARForCausalLM lives, relative to the tidar package."""
TRTLLM_PLUGIN_MODULE = "tidar.plugins.trtllm_plugin"
TENSORRT_ENGINE = artifacts.TENSORRT_ENGINE  # where the runtime's tensorrt backend looks
"""The TensorRT engine of onnx/decode_step_plugin.onnx (where TensorRT is available)."""
ENGINE_SCRIPT = "trtllm/build_engine.sh"
ENGINE_FOLDERS = {"engine": "engine", "tensorrt": Path(TENSORRT_ENGINE).parent.as_posix()}
"""Where each engine step writes (removed again when an `auto` build of it fails)."""


class ExportError(ValueError):
    """A build that cannot be done as asked (existing OUT, bad option, an engine that cannot be
    built under engine="require"); the message names the problem."""


# ---------------------------------------------------------------- validation
def validate_checkpoint(folder: Path, mask_token_id: int | None = None,
                        block_size: int | None = None) -> tuple[TiDARConfig, CheckpointSource]:
    """(config, opened source) of the checkpoint `folder`, after every check of the module
    docstring's step 1; raises CheckpointError / ConfigError / TokenizerError naming the file,
    tensor or field. `mask_token_id` / `block_size` supply or override the TiDAR fields."""
    config = TiDARConfig.from_file(folder, mask_token_id=mask_token_id, block_size=block_size)
    GenerationDefaults.from_folder(folder)  # a generation_config.json the runtime cannot read is refused now
    source = CheckpointSource(folder, config)  # names, shapes, dtypes (headers only)
    source.validate()  # every value finite, a chunk of rows at a time
    tokenizer = Tokenizer(folder)
    vocabulary = folder / "tokenizer.json"
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"{vocabulary}: vocabulary of {tokenizer.vocab_size} tokens is larger than "
                             f"config.json's vocab_size {config.vocab_size}")
    if config.mask_token_id >= tokenizer.vocab_size:
        raise TokenizerError(f"{vocabulary}: has no token with the mask id tidar.mask_token_id = "
                             f"{config.mask_token_id} (vocabulary of {tokenizer.vocab_size} tokens)")
    return config, source


def check_options(config: TiDARConfig, tp: int, dtype: str, draft_len: int, engine: str,
                  draft_blocks: int | None = None) -> None:
    """Raise ExportError / ConversionError naming the option that does not fit the model."""
    if engine not in ENGINE_MODES:
        raise ExportError(f"engine must be one of {', '.join(ENGINE_MODES)}, got {engine!r}")
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or not 0 <= draft_len <= config.block_size:
        raise ExportError(f"draft length must be an integer in [0, block_size={config.block_size}], "
                          f"got {draft_len!r}")
    try:
        check_draft_shape(draft_len, draft_blocks)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    trtllm_config(config, tp, dtype)  # tp against the heads, and the dtype


# ---------------------------------------------------------------- hashes, versions
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_files(folder: Path) -> list[Path]:
    """The checkpoint files an export depends on: config, index, weight files, tokenizer files,
    generation config."""
    files = [folder / "config.json", folder / "model.safetensors.index.json"]
    files += sorted(set(weight_files(folder).values()))
    files += [folder / name for name in (*TOKENIZER_FILES, GENERATION_FILE)]
    return [path for path in dict.fromkeys(files) if path.is_file()]


def artifact_records(out: Path) -> list[dict]:
    """{path (relative, POSIX), size, sha256} of every file under `out` but the manifest."""
    return [{"path": path.relative_to(out).as_posix(), "size": path.stat().st_size, "sha256": sha256(path)}
            for path in sorted(out.rglob("*")) if path.is_file() and path.relative_to(out).as_posix() != MANIFEST]


def versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries an export depends on (None: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "tidar": tidar.__version__}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def write_config(folder: Path, config: TiDARConfig, out: Path) -> None:
    """OUT/config.json: the checkpoint's config.json as it is, but for its `tidar` block, which
    holds the resolved fields (`TiDARConfig.tidar_block`)."""
    raw = json.loads((folder / "config.json").read_text())
    raw["tidar"] = config.tidar_block()
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def config_summary(config: TiDARConfig) -> dict:
    return {"model_type": config.model_type, "vocab_size": config.vocab_size,
            "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "block_size": config.block_size, "mask_token_id": config.mask_token_id,
            "max_position_embeddings": config.max_position_embeddings, "torch_dtype": config.torch_dtype}


# ---------------------------------------------------------------- onnx
def export_onnx(config: TiDARConfig, source: CheckpointSource, folder: Path, steps: "_Steps") -> None:
    """Both ONNX step graphs of ONNX_GRAPHS, the LM-head graph ONNX_HEAD and their shared
    weights file ONNX_WEIGHTS, in `folder`."""
    from .onnx_export import export_decode_steps

    dtype = DTYPES[ONNX_DTYPE]
    with steps.quiet_library():
        export_decode_steps(config, lambda name: source.row_chunks(name, dtype),
                            {attention: folder / relative for attention, relative in ONNX_GRAPHS.items()},
                            folder / ONNX_WEIGHTS, folder / ONNX_HEAD, dtype=dtype, progress=steps.note)


# ---------------------------------------------------------------- engines
def engine_unavailable_reason() -> str | None:
    """Why no TensorRT-LLM engine can be built here (None: it can): TensorRT-LLM 1.2.x with its
    engine builder, the hybrid-attention plugin wrapper, and a GPU."""
    from .trtllm_model import TRTLLM_IMPORT_ERROR

    if TRTLLM_IMPORT_ERROR:
        return TRTLLM_IMPORT_ERROR
    try:
        importlib.import_module("tensorrt_llm.builder")
    except ImportError as exc:
        version = versions().get("tensorrt_llm")
        return f"tensorrt_llm {version} has no TensorRT-engine builder (the engine flow ended with 1.2.x): {exc}"
    try:
        if importlib.util.find_spec(TRTLLM_PLUGIN_MODULE) is None:
            return (f"{TRTLLM_PLUGIN_MODULE} (the TensorRT-LLM plugin of tidar::hybrid_attention) "
                    "is not part of this tidar")
    except ImportError as exc:
        return f"{TRTLLM_PLUGIN_MODULE} cannot be found: {exc}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: building a TensorRT-LLM engine needs a GPU"
    from tidar.plugins.contract import engine_triton_problem

    return engine_triton_problem()


def tensorrt_unavailable_reason() -> str | None:
    """Why no TensorRT engine of the plugin ONNX graph can be built here (None: it can)."""
    from .tensorrt_engine import unavailable_reason

    return unavailable_reason()


def engine_script(config: TiDARConfig, tp: int, draft_len: int, draft_blocks: int | None = None) -> str:
    """build_engine.sh: the trtllm-build command that turns OUT/trtllm into OUT/engine, with the
    model definition read from the installed tidar package (export/trtllm_model.py)."""
    flags = [("--checkpoint_dir", "trtllm"), ("--output_dir", "engine"),
             ("--model_cls_file", '"$MODEL_CLS_FILE"'), ("--model_cls_name", TRTLLM_MODEL_CLASS),
             *((f"--{key}", value) for key, value in engine_limits(config, draft_len,
                                                                    draft_blocks=draft_blocks).items()),
             ("--max_draft_len", draft_len)]
    # No --workers: with more than one worker trtllm-build pickles the model class into spawned
    # processes, which cannot import a --model_cls_file module; one worker builds every rank.
    command = "trtllm-build " + " \\\n    ".join(f"{flag} {value}" for flag, value in flags)
    return f"""#!/usr/bin/env bash
# Build the TensorRT-LLM engine of this export on a GPU host (TensorRT-LLM 1.2.x, the last
# release with the trtllm-build engine flow): reads trtllm/ (tp={tp}), writes engine/.
# Sizes: draft length {draft_len}, {Layout.decode(draft_len, draft_blocks).num_blocks} mask blocks (one decode step = {Layout.decode(draft_len, draft_blocks).num_new} tokens per row).
# Needs tidar installed in the same Python (the model file imports it); TIDAR_ROOT overrides
# where the tidar package is.
set -euo pipefail
cd "$(dirname "$0")/.."
TIDAR_ROOT="${{TIDAR_ROOT:-$(python3 -c 'import pathlib, tidar; print(pathlib.Path(tidar.__file__).parent)')}}"
MODEL_CLS_FILE="$TIDAR_ROOT/{TRTLLM_MODEL_FILE}"
if [ ! -f "$MODEL_CLS_FILE" ]; then
    echo "build_engine.sh: $MODEL_CLS_FILE does not exist: is tidar installed in this Python?" >&2
    exit 1
fi
{command}
"""


def engine_skip_reasons(engine: str) -> dict[str, str | None]:
    """{manifest step: why it is skipped, or None} for the TensorRT-LLM engine ("engine") and the
    TensorRT engine of the plugin graph ("tensorrt") under the `engine` option."""
    if engine == "skip":
        return {"engine": "not requested", "tensorrt": "not requested"}
    return {"engine": engine_unavailable_reason(), "tensorrt": tensorrt_unavailable_reason()}


def build_trtllm_engine(folder: Path, config: TiDARConfig, tp: int, draft_len: int,
                        draft_blocks: int | None = None) -> dict:
    """TensorRT-LLM engines of folder/trtllm, one per rank, into folder/engine (config.json and
    rank{r}.engine) through TensorRT-LLM's Python API; returns what the manifest records."""
    from tensorrt_llm.builder import BuildConfig, build

    from .trtllm_model import TiDARForCausalLM

    limits = engine_limits(config, draft_len, draft_blocks=draft_blocks)
    build_config = BuildConfig(**limits)
    for rank in range(tp):
        try:
            model = TiDARForCausalLM.from_checkpoint(str(folder / "trtllm"), rank=rank)
            model.config.tidar["draft_len"] = draft_len  # the decode step the profile is tuned for (even 0)
            model.config.tidar["draft_blocks"] = draft_blocks
            build(model, build_config).save(str(folder / "engine"))
        except Exception as exc:  # TensorRT-LLM raises many types (AssertionError, RuntimeError, ...)
            raise ExportError(f"TensorRT-LLM engine build failed for rank {rank}: "
                              f"{type(exc).__name__}: {exc}") from exc
    return trtllm_engine_record(config, tp, draft_len, draft_blocks)


def trtllm_engine_record(config: TiDARConfig, tp: int, draft_len: int, draft_blocks: int | None = None) -> dict:
    """What manifest.json records of a TensorRT-LLM engine build: the builder, ranks, the draft
    shape and the `engine_limits` it was built with (max_batch_size is what `render_triton` serves)."""
    return {"builder": "tensorrt_llm.builder.build", "tensorrt_llm": versions().get("tensorrt_llm"),
            "ranks": tp, "draft_len": draft_len, "draft_blocks": draft_blocks,
            **engine_limits(config, draft_len, draft_blocks=draft_blocks)}


TENSORRT_GRAPH = "tensorrt/graph/decode_step_plugin.onnx"
"""Where the plugin graph in the export's dtype is traced for the TensorRT build when that dtype is
not ONNX_DTYPE (an intermediate: removed once the engine is built)."""


def build_tensorrt(folder: Path, config: TiDARConfig, draft_len: int, draft_blocks: int | None = None,
                   source: CheckpointSource | None = None, dtype: str = ONNX_DTYPE) -> dict:
    """The TensorRT engine of the plugin ONNX graph into folder/TENSORRT_ENGINE, computing in
    `dtype` (the export's, by default the checkpoint's): TensorRT builds a strongly typed network,
    so the engine computes in the graph's dtype; onnx/ holds the float32 graph (ONNX Runtime's CPU
    provider has no bfloat16 kernels), so for another dtype the plugin graph is traced again in it
    from `source` into TENSORRT_GRAPH's folder, built, and removed."""
    from .onnx_export import export_decode_steps
    from .tensorrt_engine import TensorRTEngineError, build_tensorrt_engine

    graph = folder / ONNX_GRAPHS["plugin"]
    scratch = None
    if dtype != ONNX_DTYPE:
        if source is None:
            raise ExportError(f"a {dtype} TensorRT engine needs the checkpoint source to trace its graph")
        graph = folder / TENSORRT_GRAPH
        scratch = graph.parent
        export_decode_steps(config, lambda name: source.row_chunks(name, DTYPES[dtype]), {"plugin": graph},
                            scratch / "decode_step.weights", scratch / "lm_head.onnx", dtype=DTYPES[dtype])
    try:
        record = build_tensorrt_engine(graph, folder / TENSORRT_ENGINE, config, draft_len, draft_blocks=draft_blocks)
    except (TensorRTEngineError, RuntimeError) as exc:
        raise ExportError(f"TensorRT engine build failed: {exc}") from exc
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {**record, "dtype": dtype}


def render_triton(folder: Path, built: list[str], engines: dict[str, dict] | None = None) -> dict:
    """OUT/triton_repo for the best backend that was built: the TensorRT engine (its attention
    plugin is ahead-of-time, no Python per layer: docs/design.md §3.8), else the TensorRT-LLM
    engine (one instance per GPU), else the ONNX graph on ONNX Runtime (CPU). An engine
    repository takes its batch limits from the engine's manifest record (`engines[step]`): no
    more rows than the engine was built for, start-up autotune up to that batch, so it never asks
    the engine for a shape outside its profile."""
    step = "tensorrt" if "tensorrt" in built else "engine" if "engine" in built else None
    backend = {"engine": "trtllm", "tensorrt": "tensorrt", None: "onnxruntime"}[step]
    kind = "KIND_CPU" if backend == "onnxruntime" else "KIND_GPU"
    limits = {}
    if step is not None:
        defaults = ServingOptions()
        rows, autotune = serving_batch_sizes(recorded_batch_limit((engines or {}).get(step, {}), step),
                                             defaults.max_batch_size, defaults.autotune_batch_sizes)
        limits = {"max_batch_size": rows, "autotune_batch_sizes": autotune}
    render_repository(folder / "triton_repo", model_dir="../..", backend=backend, instance_kind=kind, **limits)
    return {"backend": backend, "instance_kind": kind, "model_dir": "../.. (OUT, relative to triton_repo/tidar)",
            **{name: list(value) if isinstance(value, tuple) else value for name, value in limits.items()}}


# ---------------------------------------------------------------- atomic output
def check_out(out: Path, force: bool) -> None:
    """Refuse an existing OUT unless `force`, and even then anything that is not an export."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"{out}: already exists; pass --force (force=True) to replace it")
    if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise ExportError(f"{out}: exists and is not a tidar-export output (no {MANIFEST}); "
                          "refusing to replace it even with --force")


@contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of `out` to build into; renamed to `out` when the block succeeds
    (replacing an old `out` only then), removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir()  # with the umask's permissions, which OUT keeps
    try:
        yield partial
        check_out(out, force)  # again: something may have appeared at `out` meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old)
        else:
            partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


# ---------------------------------------------------------------- progress
class _Steps:
    """Progress on stderr: a tqdm bar over the build's steps on a terminal, plain numbered lines
    otherwise (logs); files written are noted one per line."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.total, self.count, self.enabled = total, 0, enabled
        self.bar = tqdm(total=total, file=sys.stderr, disable=not (enabled and sys.stderr.isatty()),
                        unit="step", bar_format="{desc:<40} {n_fmt}/{total_fmt} [{elapsed}]")

    def start(self, description: str) -> None:
        self.bar.set_description_str(description)
        if self.enabled and self.bar.disable:
            print(f"[{self.count + 1}/{self.total}] {description}", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.count += 1
        self.bar.update(1)

    def note(self, line: str) -> None:
        if self.enabled:
            self.bar.write(f"    {line}", file=sys.stderr)

    @contextmanager
    def quiet_library(self) -> Iterator[None]:
        """The exporter's own chatter (torch.onnx prints and warns) goes to stderr while
        progress is on, nowhere otherwise; stdout stays the command's."""
        exporter_log = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed" warnings
        level = exporter_log.level
        exporter_log.setLevel(logging.ERROR)
        try:
            with open(os.devnull, "w") as devnull, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with redirect_stdout(sys.stderr if self.enabled else devnull):
                    yield
        finally:
            exporter_log.setLevel(level)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------- the build
def build(checkpoint: str | Path, out: str | Path, tp: int = 1, dtype: str | None = None,
          draft_len: int | None = None, engine: str = "auto", force: bool = False,
          progress: bool = True, draft_blocks: int | None = None, mask_token_id: int | None = None,
          block_size: int | None = None) -> dict:
    """Export the TiDAR checkpoint folder `checkpoint` into `out` (see the module docstring) and
    return the manifest. `dtype` (TRT-LLM checkpoint and engine) defaults to the checkpoint's;
    `draft_len` b (engine sizes) to its block size, `draft_blocks` k (mask blocks of the decode
    step the engines are sized for, docs/design.md §3.4) to b. `mask_token_id` / `block_size`
    supply or override the checkpoint's TiDAR fields (`TiDARConfig.from_file`); OUT records the
    resolved ones. Raises CheckpointError / TokenizerError / ExportError / ConversionError naming
    the problem; nothing is left at `out` then."""
    folder, out = Path(checkpoint), Path(out)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    check_out(out, force)
    steps = _Steps(total=7, enabled=progress)
    try:
        steps.start("validating the checkpoint")
        hashes = {path.name: sha256(path) for path in input_files(folder)}
        try:
            config, source = validate_checkpoint(folder, mask_token_id, block_size)
        except (ConfigError, GenerationConfigError) as exc:
            raise CheckpointError(str(exc)) from None
        dtype = dtype or config.torch_dtype
        draft_len = config.block_size if draft_len is None else draft_len
        check_options(config, tp, dtype, draft_len, engine, draft_blocks)
        engine_reasons = engine_skip_reasons(engine)
        if engine == "require" and any(engine_reasons.values()):
            why = "; ".join(f"{step}: {reason}" for step, reason in engine_reasons.items() if reason)
            raise ExportError(f"an engine was required but cannot be built: {why}")
        steps.done()
        skipped, built = [], []
        with staging(out, force) as partial:
            steps.start("copying config and tokenizer")
            write_config(folder, config, partial)
            for name in MODEL_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, partial / name)
            steps.done()

            steps.start(f"TensorRT-LLM checkpoint (tp={tp}, {dtype})")
            convert(folder, partial / "trtllm", tp, dtype, progress=steps.note, source=source, draft_len=draft_len,
                    draft_blocks=draft_blocks)  # build_engine.sh's engine gets the profile of this draft shape
            script = partial / ENGINE_SCRIPT
            script.write_text(engine_script(config, tp, draft_len, draft_blocks))
            script.chmod(0o755)
            built.append("trtllm")
            steps.done()

            steps.start(f"ONNX decode step ({', '.join(ONNX_GRAPHS)}) and LM head")
            export_onnx(config, source, partial, steps)
            built.append("onnx")
            steps.done()

            steps.start("engines (TensorRT-LLM, TensorRT)")
            engines = {}
            for step, reason in engine_reasons.items():
                if not reason:
                    try:
                        engines[step] = (build_trtllm_engine(partial, config, tp, draft_len, draft_blocks)
                                         if step == "engine" else build_tensorrt(partial, config, draft_len,
                                                                                 draft_blocks, source, dtype))
                        built.append(step)
                        continue
                    except ExportError as exc:
                        if engine == "require":
                            raise
                        # engine="auto": a build that fails here is recorded like one that cannot run
                        shutil.rmtree(partial / ENGINE_FOLDERS[step], ignore_errors=True)
                        reason = str(exc)
                skipped.append({"step": step, "reason": reason})
                steps.note(f"{step} skipped: {reason}")
            steps.done()

            steps.start("Triton model repository")
            triton = render_triton(partial, built, engines)
            built.append("triton_repo")
            steps.note(f"triton_repo: model tidar on the {triton['backend']} backend")
            steps.done()

            steps.start("manifest")
            manifest = {
                "tidar_version": tidar.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "inputs": {"checkpoint": str(checkpoint), "checkpoint_resolved": str(folder.resolve()),
                           "sha256": hashes},
                "versions": versions(),
                "options": {"tp": tp, "dtype": dtype, "draft_len": draft_len, "draft_blocks": draft_blocks,
                            "engine": engine,
                            "onnx_dtype": ONNX_DTYPE, "mask_token_id": mask_token_id, "block_size": block_size},
                "config": config_summary(config),
                "tidar": config.resolved_fields(),
                "built": built,
                "engines": engines,
                "triton_repo": triton,
                "skipped": skipped,
                "artifacts": artifact_records(partial),
            }
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            steps.done()
        steps.note(f"wrote {out}")
        return manifest
    except ConversionError as exc:
        raise ExportError(str(exc)) from None
    finally:
        steps.close()


"""`tidar-export verify`: re-check every artifact of a `tidar-export build` output.

    verify(out, threads=0) -> report      report["ok"] is False on any mismatch

Checks (each a `Check` in the report: "ok", "failed" or "skipped", with a one-line detail):

- artifact:PATH   every file listed in manifest.json exists with its recorded size and sha256,
                  and no file is in OUT that the manifest does not list.
- source          the source checkpoint recorded in the manifest still has the recorded hashes.
                  If it no longer exists, the checks below use the manifest's hashes and the
                  artifacts themselves, and say so; if it changed, this check fails.
- trtllm          the rank files reassemble (`trtllm_checkpoint.reassemble`) into exactly the
                  source tensors (in the export's dtype) and the source config. The source's
                  TiDAR fields are those OUT/config.json records (the build resolved them: a
                  released checkpoint's inferred fields, or the build's --mask-token-id /
                  --block-size), so verify needs no flag.
- onnx:standard   ONNX Runtime logits (the standard step graph, then the LM-head graph on every
                  row) equal the fp32 reference model's within 1e-4 on fixed
                  prompts (a prefill and a decode step), and greedy decoding through
                  `DecodeEngine` gives identical tokens at the shapes of `verified_shapes`: AR, every
                  block size the model was trained on (k = b blocks), and the largest with k = 4
                  blocks (a k-of-b step) when it is larger than 4.
                  The reference is the source checkpoint, or, without it, the weights reassembled
                  from trtllm/ when they are exact (same dtype as the source).
- onnx:plugin     the plugin graph passes onnx.checker with one tidar::hybrid_attention node per
                  layer (ONNX Runtime cannot run the node). Its weights live in the external-data
                  file it shares with the standard graph, which the standard check has run.
- tensorrt        the TensorRT engine of the plugin graph, when the build made one and TensorRT
                  and a GPU are here: greedy tokens through `DecodeEngine` equal the reference's
                  at the shapes of `verified_shapes`; skipped with the reason otherwise.
- engine          the TensorRT-LLM engine (tp = 1), likewise, through the runtime's trtllm backend;
                  skipped with the reason where TensorRT-LLM or a GPU is missing.
- triton_repo     the repository is rendered (no template field left), its model folder points at
                  OUT and the backend it names has its artifact in OUT.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tidar.runtime.checkpoint import CheckpointError, ignorable_tensor, load_model, weight_files
from tidar.runtime.backends.engine_backend import TENSORRT_ENGINE, TRTLLM_ENGINE, TRTLLM_WEIGHTS
from tidar.runtime.config import ConfigError, TiDARConfig
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.layout import Layout
from tidar.runtime.tokenizer import Tokenizer

from .build import MANIFEST, ONNX_GRAPHS, ONNX_HEAD, sha256
from .trtllm_checkpoint import DTYPES, ConversionError, reassemble

TOLERANCE = 1e-4
PROMPTS = ("def main():", "import os\nimport sys", "class Stack:\n    def push(self, x):")
MAX_NEW_TOKENS = 16


class VerifyError(ValueError):
    """OUT is not something verify can check (no folder, no readable manifest.json)."""


@dataclass
class Check:
    name: str
    status: str  # "ok" | "failed" | "skipped"
    detail: str


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not out.is_dir():
        raise VerifyError(f"{out}: not a folder")
    try:
        manifest = json.loads(path.read_text())
        manifest["artifacts"], manifest["inputs"]["sha256"]  # noqa: B018 (the fields verify needs)
    except FileNotFoundError:
        raise VerifyError(f"{path}: no such file; {out} is not a tidar-export build output") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VerifyError(f"{path}: not a tidar-export manifest ({exc})") from None
    return manifest


# ---------------------------------------------------------------- files
def check_artifacts(out: Path, manifest: dict) -> list[Check]:
    checks = []
    listed = set()
    for record in manifest["artifacts"]:
        relative = record["path"]
        listed.add(relative)
        path = out / relative
        if not path.is_file():
            checks.append(Check(f"artifact:{relative}", "failed", "missing"))
        elif path.stat().st_size != record["size"] or sha256(path) != record["sha256"]:
            checks.append(Check(f"artifact:{relative}", "failed", "sha256 differs from manifest.json (modified)"))
        else:
            checks.append(Check(f"artifact:{relative}", "ok", f"{record['size']} bytes, sha256 matches"))
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out).as_posix()
        if path.is_file() and relative != MANIFEST and relative not in listed:
            checks.append(Check(f"artifact:{relative}", "failed", "not listed in manifest.json"))
    return checks


def check_source(manifest: dict) -> tuple[Check, Path | None]:
    """The source check, and the source folder if it still holds exactly the build's inputs."""
    inputs = manifest["inputs"]
    folder = Path(inputs.get("checkpoint_resolved") or inputs["checkpoint"])
    if not folder.is_dir():
        return Check("source", "skipped", f"source checkpoint {folder} no longer exists: artifacts are "
                                          "checked against manifest.json's hashes only"), None
    for name, digest in inputs["sha256"].items():
        path = folder / name
        if not path.is_file():
            return Check("source", "failed", f"{path}: missing since the build"), None
        if sha256(path) != digest:
            return Check("source", "failed", f"{path}: changed since the build (sha256 differs)"), None
    return Check("source", "ok", f"{folder}: {len(inputs['sha256'])} input files unchanged"), folder


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the HF checkpoint `folder`, as stored."""
    from safetensors import safe_open

    state = {}
    for name, path in weight_files(folder).items():
        with safe_open(path, framework="pt") as handle:
            state[name] = handle.get_tensor(name)
    return state


# ---------------------------------------------------------------- trtllm
def resolved_overrides(config: TiDARConfig) -> dict[str, int]:
    """The TiDAR fields OUT/config.json records, as overrides for reading the source checkpoint
    (which may have no `tidar` block, or other values the build overrode)."""
    return {"mask_token_id": config.mask_token_id, "block_size": config.block_size}


def check_trtllm(out: Path, source: Path | None) -> tuple[Check, tuple[TiDARConfig, dict] | None]:
    """The trtllm check, and the reassembled (config, state) when reassembly succeeded."""
    try:
        config, state = reassemble(out / "trtllm")
    except ConversionError as exc:
        return Check("trtllm", "failed", f"does not reassemble: {exc}"), None
    if source is None:
        return Check("trtllm", "ok", f"{len(state)} tensors reassemble consistently (source checkpoint "
                                     "gone: compared with manifest hashes only)"), (config, state)
    if config != TiDARConfig.from_file(source, **resolved_overrides(TiDARConfig.from_file(out))):
        return Check("trtllm", "failed", "trtllm/config.json: tidar.hf_config differs from the source config.json"), None
    expected = {name: t for name, t in source_tensors(source).items() if not ignorable_tensor(name, config)}
    if set(state) != set(expected):
        name = sorted(set(state) ^ set(expected))[0]
        return Check("trtllm", "failed", f"tensor {name!r} is in only one of the source and trtllm/"), None
    dtype = next(iter(state.values())).dtype
    for name, tensor in expected.items():
        if not torch.equal(state[name], tensor.to(dtype)):
            return Check("trtllm", "failed", f"tensor {name!r} reassembled from the rank files differs from "
                                             "the source"), None
    return Check("trtllm", "ok", f"rank files reassemble into exactly the {len(state)} source tensors "
                                 f"({str(dtype).removeprefix('torch.')})"), (config, state)


def reference_model(source: Path | None, reassembled: tuple[TiDARConfig, dict] | None,
                    exported: TiDARConfig | None = None):
    """(fp32 reference model, where it came from) or (None, why there is none); `exported` is
    OUT's config, whose TiDAR fields the source is read with."""
    if source is not None:
        overrides = resolved_overrides(exported) if exported is not None else {}
        return load_model(source, dtype="float32", **overrides), f"the source checkpoint {source}"
    if reassembled is None:
        return None, "no source checkpoint and trtllm/ did not reassemble"
    config, state = reassembled
    if next(iter(state.values())).dtype != DTYPES[config.torch_dtype]:
        return None, (f"no source checkpoint, and trtllm/ is not in the source dtype {config.torch_dtype}, "
                      "so its weights are not the exported ones")
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as scratch:  # load_model reads a checkpoint folder
        save_file({name: t.contiguous() for name, t in state.items()}, str(Path(scratch) / "model.safetensors"))
        config.save(scratch)
        return load_model(scratch, dtype="float32"), "the weights reassembled from trtllm/"


# ---------------------------------------------------------------- onnx
def check_onnx_standard(out: Path, reference, origin: str, threads: int) -> Check:
    from tidar.runtime.backends.torch_backend import TorchBackend
    from tidar.runtime.backends.onnx_backend import OnnxRuntimeBackend

    name = "onnx:standard"
    if reference is None:
        return Check(name, "skipped", f"no reference model: {origin}")
    try:
        onnx_backend = OnnxRuntimeBackend(out / ONNX_GRAPHS["standard"], out / ONNX_HEAD, TiDARConfig.from_file(out),
                                          threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        return Check(name, "failed", f"{ONNX_GRAPHS['standard']}, {ONNX_HEAD}: ONNX Runtime cannot load them ({exc})")
    torch_backend = TorchBackend(reference)
    tokenizer = Tokenizer(out)
    config = reference.config
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        block = config.block_size
        caches = [backend.new_cache(1, len(ids) + 2 * Layout.decode(block).num_new)
                  for backend in (torch_backend, onnx_backend)]
        steps = [(Layout.prefill(len(ids), block), ids + [config.mask_token_id] * block),
                 (Layout.decode(block), (ids * block)[:block] + [config.mask_token_id] * block * block)]
        for layout, tokens in steps:
            input_ids = torch.tensor([tokens])
            expected, actual = (backend.forward(input_ids, layout, cache).float()
                                for backend, cache in zip((torch_backend, onnx_backend), caches))
            worst = max(worst, (expected - actual).abs().max().item())
            for cache in caches:
                cache.commit([layout.causal_len])
    if not worst < TOLERANCE:
        return Check(name, "failed", f"{ONNX_GRAPHS['standard']}: logits differ from {origin} by {worst:.2e} "
                                     f"(tolerance {TOLERANCE})")
    shapes = verified_shapes(config)
    mismatch = greedy_mismatch(torch_backend, onnx_backend, tokenizer, shapes)
    if mismatch is not None:
        return Check(name, "failed", f"{ONNX_GRAPHS['standard']}: greedy tokens differ from {origin} "
                                     f"at draft shape {shape_name(mismatch)}")
    return Check(name, "ok", f"logits within {worst:.1e} of {origin}; identical greedy tokens at draft "
                             f"shapes {', '.join(map(shape_name, shapes))}")


def check_onnx_plugin(out: Path, num_layers: int) -> Check:
    import onnx

    from .onnx_export import PLUGIN_DOMAIN, PLUGIN_OP, plugin_schema

    relative = ONNX_GRAPHS["plugin"]
    plugin_schema()  # registers the node's schema so the checker validates it
    try:
        onnx.checker.check_model(str(out / relative), full_check=True)  # external data resolved, not loaded
        graph = onnx.load(out / relative, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / ValidationError and others
        return Check("onnx:plugin", "failed", f"{relative}: not a valid ONNX graph ({exc})")
    nodes = [n for n in graph.graph.node if n.domain == PLUGIN_DOMAIN and n.op_type == PLUGIN_OP]
    if len(nodes) != num_layers:
        return Check("onnx:plugin", "failed", f"{relative}: {len(nodes)} {PLUGIN_DOMAIN}::{PLUGIN_OP} nodes for "
                                              f"{num_layers} layers")
    return Check("onnx:plugin", "ok", f"valid, one {PLUGIN_DOMAIN}::{PLUGIN_OP} node per layer ({num_layers})")


# ---------------------------------------------------------------- tensorrt
def verified_shapes(config: TiDARConfig) -> list[tuple[int, int | None]]:
    """The draft shapes (b, k; None: k = b) greedy decoding is compared at: AR, each block size
    the model was trained on (it decodes with no other), and the largest with k = 4 mask blocks
    (a k-of-b step, docs/design.md §3.4) when it is larger than 4."""
    trained = sorted(config.trained_block_sizes)
    return [(0, None), *((b, None) for b in trained), *(((trained[-1], 4),) if trained[-1] > 4 else ())]


def as_shape(shape) -> tuple[int, int | None]:
    """(b, k) of a draft length b (k = b: None) or a (b, k) pair."""
    return (shape, None) if isinstance(shape, int) else tuple(shape)


def shape_name(shape) -> str:
    draft_len, draft_blocks = as_shape(shape)
    return f"b={draft_len}" + (f",k={draft_blocks}" if draft_blocks is not None else "")


def greedy_mismatch(reference_backend, candidate, tokenizer, shapes):
    """The first of `shapes` (draft lengths, or (b, k) shapes) at which `candidate`'s greedy
    tokens differ from the reference's on PROMPTS, as given (None: identical everywhere)."""
    requests = [Request(tokenizer.encode(prompt), MAX_NEW_TOKENS, eos_ids=()) for prompt in PROMPTS]
    for shape in shapes:
        draft_len, draft_blocks = as_shape(shape)
        runs = [DecodeEngine(backend, tokenizer, draft_len, draft_blocks=draft_blocks).generate(requests)
                for backend in (reference_backend, candidate)]
        if [r.token_ids for r in runs[0]] != [r.token_ids for r in runs[1]]:
            return shape
    return None


def check_triton_repo(out: Path) -> Check:
    """OUT/triton_repo is rendered and serves OUT with an artifact that exists."""
    from tidar.serving.requests import ServingOptions

    config_file = out / "triton_repo" / "tidar" / "config.pbtxt"
    if not config_file.is_file():
        return Check("triton_repo", "failed", f"{config_file} is missing")
    text = config_file.read_text()
    if "${" in text:
        return Check("triton_repo", "failed", f"{config_file} has unrendered template fields")
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
    try:
        options = ServingOptions.from_parameters(params)
    except ValueError as exc:
        return Check("triton_repo", "failed", str(exc))
    model_dir = (config_file.parent / options.model_dir).resolve()
    if model_dir != out.resolve():
        return Check("triton_repo", "failed", f"{config_file}: model_dir {options.model_dir!r} resolves to "
                                              f"{model_dir}, not OUT")
    artifacts = {"onnxruntime": (ONNX_GRAPHS["standard"], ONNX_HEAD), "tensorrt": (TENSORRT_ENGINE, ONNX_HEAD),
                 "trtllm": (TRTLLM_ENGINE, TRTLLM_WEIGHTS)}.get(options.backend, ())
    for artifact in artifacts:
        if not (out / artifact).is_file():
            return Check("triton_repo", "failed", f"backend {options.backend} needs {artifact}, which is missing")
    return Check("triton_repo", "ok", f"model tidar serves OUT on the {options.backend} backend")


def check_engine(out: Path, step: str, reference, origin: str) -> Check:
    """An engine of the build ("tensorrt": the TensorRT engine of the plugin graph; "engine": the
    TensorRT-LLM engine, tp = 1) gives the reference's greedy tokens (docs/design.md I5) through the
    runtime's engine backend; skipped with the reason where it cannot run here."""
    from tidar.runtime.backends.torch_backend import TorchBackend
    from tidar.runtime.backends.engine_backend import EngineBackend

    from .build import engine_unavailable_reason
    from .tensorrt_engine import unavailable_reason

    path, reason = ((TENSORRT_ENGINE, unavailable_reason()) if step == "tensorrt"
                    else (TRTLLM_ENGINE, engine_unavailable_reason()))
    if reason:
        return Check(step, "skipped", f"{path} matches manifest.json's hash; running it needs: {reason}")
    if reference is None:
        return Check(step, "skipped", f"no reference model: {origin}")
    try:
        opened = EngineBackend.tensorrt if step == "tensorrt" else EngineBackend.trtllm
        engine = opened(out, TiDARConfig.from_file(out))
    except Exception as exc:  # TensorRT reports deserialization problems with its own types
        return Check(step, "failed", f"{path}: cannot be loaded ({exc})")
    shapes = verified_shapes(reference.config)
    mismatch = greedy_mismatch(TorchBackend(reference), engine, Tokenizer(out), shapes)
    if mismatch is not None:
        return Check(step, "failed", f"{path}: greedy tokens differ from {origin} at draft shape {shape_name(mismatch)}")
    return Check(step, "ok", f"identical greedy tokens to {origin} at draft shapes {', '.join(map(shape_name, shapes))}")


# ---------------------------------------------------------------- the report
def verify(out: str | Path, threads: int = 0) -> dict:
    """Check every artifact of the export `out` (see the module docstring); returns
    {"out", "ok", "checks": [{"name", "status", "detail"}, ...]}. Raises VerifyError when `out`
    is not an export at all. `threads`: ONNX Runtime intra-op threads (0: its default)."""
    out = Path(out)
    manifest = read_manifest(out)
    try:
        config = TiDARConfig.from_file(out)
    except ConfigError as exc:
        raise VerifyError(str(exc)) from None
    present = {record["path"].split("/")[0] for record in manifest["artifacts"]}
    checks = check_artifacts(out, manifest)
    source_check, source = check_source(manifest)
    checks.append(source_check)
    reassembled = None
    if "trtllm" in present:
        trtllm_check, reassembled = check_trtllm(out, source)
        checks.append(trtllm_check)
    reference, origin = None, "not needed"
    if present & {"onnx", "tensorrt", "engine"}:
        try:
            reference, origin = reference_model(source, reassembled, config)
        except CheckpointError as exc:
            reference, origin = None, str(exc)
    if "onnx" in present:
        checks.append(check_onnx_standard(out, reference, origin, threads))
        checks.append(check_onnx_plugin(out, config.num_hidden_layers))
    reasons = {entry["step"]: entry["reason"] for entry in manifest.get("skipped", [])}
    for step in ("engine", "tensorrt", "triton_repo"):
        if step not in present:
            checks.append(Check(step, "skipped", reasons.get(step, "not built")))
        elif step in ("tensorrt", "engine"):
            checks.append(check_engine(out, step, reference, origin))
        else:
            checks.append(check_triton_repo(out))
    return {"out": str(out), "ok": not any(c.status == "failed" for c in checks),
            "checks": [asdict(c) for c in checks]}

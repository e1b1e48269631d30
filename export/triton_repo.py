"""Render the Triton Inference Server model repository from the templates in `triton_repo/`.

    render_repository(dest, model_dir="../..", backend="onnxruntime", ...) -> dest

Copies the template model folders to `dest` — `tidar` (the Python-backend model) and, unless
`ensemble=False`, `ensemble` (the same model under the name tensorrtllm_backend's clients use:
a one-step Triton ensemble, so one instance and one scheduler serve both names) — and fills the
`${...}` fields of their config.pbtxt with `string.Template` (the convention of
tensorrtllm_backend's fill_template.py). The `input`/`output` blocks are rendered from the wire
contract (runtime/wire.py). A field left unfilled, or a value that would break the config, is an
error. `tidar-export build` renders OUT/triton_repo with `model_dir` = the
export folder as a path relative to the model folder, so OUT can be moved as a whole.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import tidar
from tidar.runtime.cuda_graphs import SETTINGS as CUDA_GRAPH_SETTINGS
from tidar.runtime.wire import INPUTS, MAX_BATCH_SIZE, OUTPUTS, TensorSpec

TEMPLATES = Path(tidar.__file__).resolve().parent / "triton_repo"
SERVING_BACKENDS = ("torch", "onnxruntime", "tensorrt", "trtllm")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")


class RenderError(ValueError):
    """A template that cannot be filled as asked; the message names the field."""


def template_fields(templates: Path = TEMPLATES) -> set[str]:
    """The `${...}` fields the templates use."""
    fields = set()
    for config in templates.glob("*/config.pbtxt"):
        for match in string.Template.pattern.finditer(config.read_text()):
            name = match.group("named") or match.group("braced")
            if name:
                fields.add(name)
    return fields


def _io_block(specs: tuple[TensorSpec, ...]) -> str:
    rows = []
    for spec in specs:
        dims = ", ".join(str(d) for d in spec.dims)
        optional = " optional: true" if spec.optional else ""
        rows.append(f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ {dims} ]{optional} }}')
    return ",\n".join(rows)


def _ensemble_maps() -> str:
    maps = [f'      input_map {{ key: "{s.name}" value: "{s.name}" }}' for s in INPUTS]
    maps += [f'      output_map {{ key: "{s.name}" value: "{s.name}" }}' for s in OUTPUTS]
    return "\n".join(maps)


def render_repository(dest: str | Path, *, model_dir: str, backend: str = "onnxruntime", draft_len: str = "auto",
                      max_batch_size: int = 16, max_queue_size: int = 64, max_tokens_limit: int = 0,
                      default_timeout: float = 0, instance_count: int = 1, instance_kind: str = "KIND_CPU",
                      autotune_batch_sizes: str = "1,4,16", autotune_draft_lens: str = "0,1,2,3,4",
                      autotune_repeats: int = 3, threads: int = 0, attention: str = "sdpa", dtype: str = "",
                      cuda_graphs: str = "auto", ensemble: bool = True, templates: Path = TEMPLATES,
                      autotune_draft_blocks: str = "1,2") -> Path:
    """Write the rendered repository to `dest` (which must not exist). `model_dir` is the model
    or export folder, absolute or relative to dest/tidar; `draft_len` is "auto" or an integer;
    `autotune_draft_blocks` the block counts k tried below k = b (docs/design.md §3.4);
    `instance_kind` KIND_GPU puts `instance_count` instances on every GPU; `attention` is the torch
    backend's attention implementation and `dtype` its compute dtype ("" = the checkpoint's; the other
    backends have their own); `cuda_graphs` ("auto", "true", "false") runs the torch backend's decode
    steps as CUDA graphs (auto: on KIND_GPU). The autotune
    defaults keep the start-up measurement to seconds on a CPU; widen them on a GPU, where
    longer drafts pay. `ensemble` also serves the model as `ensemble` (tensorrtllm_backend's name)."""
    dest = Path(dest)
    if backend not in SERVING_BACKENDS:
        raise RenderError(f"backend must be one of {', '.join(SERVING_BACKENDS)}, got {backend!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise RenderError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if cuda_graphs not in CUDA_GRAPH_SETTINGS:
        raise RenderError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_SETTINGS)}, got {cuda_graphs!r}")
    if cuda_graphs == "true" and instance_kind != "KIND_GPU":
        raise RenderError("cuda_graphs 'true' needs instance_kind KIND_GPU (CUDA graphs are captured on a GPU)")
    if draft_len != "auto" and not str(draft_len).isdigit():
        raise RenderError(f"draft_len must be 'auto' or a non-negative integer, got {draft_len!r}")
    for name, value in (("instance_count", instance_count), ("max_batch_size", max_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise RenderError(f"{name} must be a positive integer, got {value!r}")
    if '"' in str(model_dir) or "\n" in str(model_dir):
        raise RenderError(f"model_dir {model_dir!r} cannot be written into config.pbtxt")
    values = dict(model_dir=model_dir, backend=backend, draft_len=draft_len, max_batch_size=max_batch_size,
                  max_queue_size=max_queue_size, max_tokens_limit=max_tokens_limit,
                  default_timeout=default_timeout, instance_count=instance_count, instance_kind=instance_kind,
                  autotune_batch_sizes=autotune_batch_sizes, autotune_draft_lens=autotune_draft_lens,
                  autotune_draft_blocks=autotune_draft_blocks,
                  autotune_repeats=autotune_repeats, threads=threads, attention=attention, dtype=dtype,
                  cuda_graphs=cuda_graphs, triton_max_batch_size=MAX_BATCH_SIZE, inputs=_io_block(INPUTS),
                  outputs=_io_block(OUTPUTS),
                  ensemble_maps=_ensemble_maps())
    missing = template_fields(templates) - set(values)
    if missing:
        raise RenderError(f"{templates}: template fields without a value: {sorted(missing)}")
    models = [config.parent for config in templates.glob("*/config.pbtxt")
              if ensemble or config.parent.name != "ensemble"]
    rendered = {config.relative_to(templates): string.Template(config.read_text()).substitute(values)
                for config in (model / "config.pbtxt" for model in models)}
    dest.mkdir(parents=True)
    for model in models:
        shutil.copytree(model, dest / model.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "README.md"))
        (dest / model.name / "1").mkdir(exist_ok=True)  # an ensemble's version folder is empty
    for relative, text in rendered.items():
        (dest / relative).write_text(text)
    return dest

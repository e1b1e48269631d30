"""Render the Triton Inference Server model repository from the templates in `triton_repo/`.

    render_repository(dest, ServingOptions(model_dir="../..", backend="onnxruntime")) -> dest
    render_repository(dest, model_dir="../..", backend="onnxruntime")   # the same, as keywords

Copies the template model folders to `dest` — `tidar` (the Python-backend model); unless
`ensemble=False`, `ensemble` (the same model under the name tensorrtllm_backend's clients use:
a one-step Triton ensemble, so one instance and one scheduler serve both names); unless
`llmapi=False`, `tensorrt_llm` (TensorRT-LLM's LLM-API contract, a Python model that forwards
each request to `tidar`, docs/design.md §6.2) — and fills the
`${...}` fields of their config.pbtxt with `string.Template` (the convention of
tensorrtllm_backend's fill_template.py). The model parameters are `ServingOptions.to_parameters()`
(options.py: the one source of serving parameters and their defaults); the `input`/`output` blocks
are rendered from the wire contract (wire.py). A field left unfilled, or a value that would break
the config, is an error and nothing is written. `tidar-export build` renders OUT/triton_repo with
`model_dir` = the export folder as a path relative to the model folder, so OUT can be moved as a whole.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import tidar
from .options import OptionsError, ServingOptions
from .wire import INPUTS, LLMAPI_INPUTS, LLMAPI_OUTPUTS, MAX_BATCH_SIZE, OUTPUTS, TensorSpec

TEMPLATES = Path(tidar.__file__).resolve().parent / "triton_repo"
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
STRUCTURE_FIELDS = ("instance_count", "instance_kind", "triton_max_batch_size", "inputs", "outputs", "ensemble_maps",
                    "llmapi_inputs", "llmapi_outputs")
"""Template fields that are not model parameters (the rest are `ServingOptions` fields)."""


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


def render_repository(dest: str | Path, options: ServingOptions | None = None, *, instance_count: int = 1,
                      instance_kind: str = "KIND_CPU", ensemble: bool = True, llmapi: bool = True,
                      templates: Path = TEMPLATES, **option_values) -> Path:
    """Write the rendered repository to `dest` (which must not exist). `options` (or
    `option_values`, ServingOptions fields as Python values or config.pbtxt strings, applied over
    `options`) are the model's parameters; `instance_kind` KIND_GPU puts `instance_count` instances
    on every GPU; `ensemble` also serves the model as `ensemble` (tensorrtllm_backend's name),
    `llmapi` as `tensorrt_llm` (TensorRT-LLM's LLM-API contract)."""
    dest = Path(dest)
    try:
        if option_values:
            base = options.to_parameters() if options is not None else {}
            options = ServingOptions.from_values(**{**base, **option_values})
        options = options or ServingOptions()
        options.validate()
    except OptionsError as error:
        raise RenderError(str(error)) from None
    if instance_kind not in INSTANCE_KINDS:
        raise RenderError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if not isinstance(instance_count, int) or instance_count < 1:
        raise RenderError(f"instance_count must be a positive integer, got {instance_count!r}")
    if options.cuda_graphs is True and instance_kind != "KIND_GPU":
        raise RenderError("cuda_graphs 'true' needs instance_kind KIND_GPU (CUDA graphs are captured on a GPU)")
    values = dict(options.to_parameters(), instance_count=instance_count, instance_kind=instance_kind,
                  triton_max_batch_size=MAX_BATCH_SIZE, inputs=_io_block(INPUTS), outputs=_io_block(OUTPUTS),
                  ensemble_maps=_ensemble_maps(), llmapi_inputs=_io_block(LLMAPI_INPUTS),
                  llmapi_outputs=_io_block(LLMAPI_OUTPUTS))
    missing = template_fields(templates) - set(values)
    if missing:
        raise RenderError(f"{templates}: template fields without a value: {sorted(missing)}")
    models = [config.parent for config in templates.glob("*/config.pbtxt")
              if (ensemble or config.parent.name != "ensemble") and (llmapi or config.parent.name != "tensorrt_llm")]
    rendered = {config.relative_to(templates): string.Template(config.read_text()).substitute(values)
                for config in (model / "config.pbtxt" for model in models)}
    dest.mkdir(parents=True)
    for model in models:
        shutil.copytree(model, dest / model.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "README.md"))
        (dest / model.name / "1").mkdir(exist_ok=True)  # an ensemble's version folder is empty
    for relative, text in rendered.items():
        (dest / relative).write_text(text)
    return dest

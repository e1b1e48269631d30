"""A rendered engine repository never asks an engine for a shape outside its profile.

`tidar-export build` records every engine it built in manifest.json with the rows it was built
for, and renders triton_repo from that record (`export.build.render_triton`). Here the build runs
for real on a tiny checkpoint with the two GPU-only engine builds stood in by their manifest
records (`trtllm_engine_record`, `tensorrt_engine.engine_record`: what the real builds return);
the rendered config.pbtxt is read back as the Triton model reads it, and every batch the served
model may run (its max_batch_size and each start-up autotune batch) is checked against the
engine's own profile (`engine_shapes.dimension_ranges` / `tensorrt_engine.optimization_profile`,
the shapes TensorRT is given). The serving side refuses a hand-written repository that asks for
more rows than the engine's profile (`requests.check_backend_limits`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from tidar.export import build as build_module
from tidar.export import engine_shapes, tensorrt_engine
from tidar.export.cli import main
from tidar.runtime.config import TiDARConfig
from tidar.serving.options import OptionsError, ServingOptions
from tidar.serving.requests import check_backend_limits


# the builds here test what surrounds the ONNX step: its output is reused (conftest)
pytestmark = pytest.mark.usefixtures("reused_onnx_export")


def rendered_options(repository: Path) -> ServingOptions:
    """The options the Triton model reads from repository/tidar/config.pbtxt."""
    text = (repository / "tidar" / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', text))
    return ServingOptions.from_parameters(parameters)


def batches_served(options: ServingOptions) -> set[int]:
    """Every batch size the served model can run: up to max_batch_size rows, the autotuned ones
    (build_scheduler measures those <= max_batch_size)."""
    return set(range(1, options.max_batch_size + 1)) | {b for b in options.autotune_batch_sizes
                                                        if b <= options.max_batch_size}


@pytest.fixture(scope="module")
def engine_export(tiny_checkpoints, tmp_path_factory):
    """An export whose two engines were 'built' (their manifest records, no GPU)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(build_module, "engine_skip_reasons", lambda engine: {"engine": None, "tensorrt": None})

    def trtllm(folder, config, tp, draft_len, draft_blocks=None):
        (folder / "engine").mkdir()
        return build_module.trtllm_engine_record(config, tp, draft_len, draft_blocks)

    def tensorrt(folder, config, draft_len, draft_blocks=None, source=None, dtype=None):
        return tensorrt_engine.engine_record(config, draft_len, engine_shapes.ENGINE_MAX_BATCH_SIZE, draft_blocks,
                                             "stand-in", "decode_step_plugin.onnx", [])

    patch.setattr(build_module, "build_trtllm_engine", trtllm)
    patch.setattr(build_module, "build_tensorrt", tensorrt)
    out = tmp_path_factory.mktemp("engine-export") / "out"
    try:
        assert main(["build", str(tiny_checkpoints["qwen2"]), "-o", str(out), "-q"]) == 0
    finally:
        patch.undo()
    return out, json.loads((out / "manifest.json").read_text())


def test_rendered_engine_repository_fits_the_engine_profile(engine_export):
    """Both engines built: the repository serves the TensorRT engine (no Python per layer,
    docs/design.md §3.8) with the rows of its profile, the shapes TensorRT was given."""
    out, manifest = engine_export
    assert manifest["triton_repo"]["backend"] == "tensorrt"
    config = TiDARConfig.from_file(out)
    record = manifest["engines"]["tensorrt"]
    assert record["max_batch_size"] == engine_shapes.ENGINE_MAX_BATCH_SIZE
    shapes = tensorrt_engine.optimization_profile(config, record["draft_len"], record["max_batch_size"],
                                                  record["draft_blocks"])
    options = rendered_options(out / "triton_repo")
    assert options.backend == "tensorrt"
    # the whole profile is served, nothing beyond
    assert max(batches_served(options)) == shapes["input_ids"][2][0] == record["profile"]["batch"][2] == 8
    assert options.autotune_batch_sizes == (1, 4, 8)  # the defaults (1, 4, 16) cut to the engine, up to its limit
    assert manifest["triton_repo"]["max_batch_size"] == 8


def test_trtllm_repository_fits_the_trtllm_profile(engine_export, tmp_path):
    out, manifest = engine_export
    config = TiDARConfig.from_file(out)
    record = manifest["engines"]["engine"]
    folder = tmp_path / "export"
    folder.mkdir()
    triton = build_module.render_triton(folder, ["onnx", "engine"], {"engine": record})
    options = rendered_options(folder / "triton_repo")
    assert triton["backend"] == options.backend == "trtllm"
    profile_rows = engine_shapes.dimension_ranges(config, record["draft_len"], record["max_batch_size"],
                                                  record["draft_blocks"])["batch"].max
    assert max(batches_served(options)) == profile_rows == record["max_batch_size"] == 8


@pytest.mark.parametrize("record, rows, autotune", [
    ({"max_batch_size": 64}, 16, (1, 4, 16)),  # an engine larger than the default serves the default
    ({"max_batch_size": 2}, 2, (1, 2)),
    ({"profile": {"batch": [1, 1, 3]}}, 3, (1, 3)),  # a TensorRT record of an older build: its profile
])
def test_render_takes_the_rows_from_the_record(tmp_path, record, rows, autotune):
    build_module.render_triton(tmp_path, ["tensorrt"], {"tensorrt": record})
    options = rendered_options(tmp_path / "triton_repo")
    assert (options.max_batch_size, options.autotune_batch_sizes) == (rows, autotune)


def test_render_refuses_an_engine_without_limits(tmp_path):
    with pytest.raises(ValueError, match=r"engines\['engine'\] records no max_batch_size"):
        build_module.render_triton(tmp_path, ["engine"], {"engine": {"builder": "x"}})
    assert not (tmp_path / "triton_repo").exists()


def test_onnxruntime_repository_keeps_the_defaults(tmp_path):
    build_module.render_triton(tmp_path, ["onnx"], {})
    options = rendered_options(tmp_path / "triton_repo")
    assert (options.max_batch_size, options.autotune_batch_sizes) == (16, (1, 4, 16))


def test_serving_refuses_more_rows_than_the_engine_takes():
    engine = SimpleNamespace(name="tensorrt", max_batch_size=8)
    check_backend_limits(engine, ServingOptions(max_batch_size=8))
    with pytest.raises(OptionsError, match="max_batch_size 16 exceeds the tensorrt engine's optimization profile "
                                           r"\(built for at most 8 rows\)"):
        check_backend_limits(engine, ServingOptions(max_batch_size=16))
    check_backend_limits(SimpleNamespace(name="torch"), ServingOptions(max_batch_size=64))  # no engine, no limit


def test_engine_backend_reads_its_batch_limit_from_the_profile():
    from tidar.runtime.backends.engine_backend import profile_batch_limit

    class Engine:
        def get_tensor_profile_shape(self, name, profile_index):
            assert (name, profile_index) == ("input_ids", 0)
            return [(1, 1), (1, 272), (8, 2064)]

    assert profile_batch_limit(Engine()) == 8
    assert profile_batch_limit(object()) is None


@pytest.mark.parametrize("draft_len, draft_blocks", [(0, None), (4, None), (16, None), (16, 2), (4, 1)])
def test_build_engine_script_gets_the_profile_of_the_export(tiny_checkpoints, tmp_path, draft_len, draft_blocks):
    """build_engine.sh runs trtllm-build on trtllm/ with the flags `engine_script` writes; the
    model's `builder_ranges` then sees trtllm/config.json as `convert` wrote it and the flags'
    sizes (TensorRT-LLM's builder hands max_draft_len on unchanged). The engine's profile must be
    the one the export is sized for: `dimension_ranges` of its (b, k)."""
    from tidar.export.trtllm_checkpoint import convert
    from tidar.export.trtllm_model import builder_ranges

    checkpoint = tiny_checkpoints["qwen2"]
    config = TiDARConfig.from_file(checkpoint)
    folder = convert(checkpoint, tmp_path / "trtllm", 1, "float32", draft_len=draft_len, draft_blocks=draft_blocks)
    written = json.loads((folder / "config.json").read_text())
    script = build_module.engine_script(config, 1, draft_len, draft_blocks)
    flags = {name: int(value) for name, value in re.findall(r"--(max_\w+) (\d+)", script)}
    ranges = builder_ranges(written, flags["max_batch_size"], flags["max_input_len"], flags["max_seq_len"],
                            flags["max_draft_len"])
    assert ranges == engine_shapes.dimension_ranges(config, draft_len, draft_blocks=draft_blocks)
    assert ranges["past"].max == config.max_position_embeddings
    assert ranges["new"].opt == engine_shapes.step_tokens(draft_len, draft_blocks)

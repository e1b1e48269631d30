"""The TensorRT engine computes in the export's dtype, not float32 end to end (export/build.py).

TensorRT builds a strongly typed network from the plugin ONNX graph, so the engine computes in
the graph's dtype; onnx/ holds float32 graphs (ONNX Runtime's CPU provider has no bfloat16
kernels). A bfloat16 export therefore traces the plugin graph again in bfloat16 for the TensorRT
build. Here the build runs for real on a tiny checkpoint with only TensorRT's own build stood in
(it needs a GPU): the graph TensorRT would parse has bfloat16 K/V inputs, hidden-state output
and checkpoint weights (small traced constants such as RoPE's stay float32, as the model computes
them), carries one plugin node per layer, and is removed once the engine is built; a
float32 export builds from onnx/ as before.
"""

from __future__ import annotations

import json

import onnx
import pytest

from tidar.export import build as build_module
from tidar.export import engine_shapes, tensorrt_engine
from tidar.export.cli import main
from tidar.export.onnx_export import PLUGIN_OP


# the builds here test what surrounds the ONNX step: its output is reused (conftest)
pytestmark = pytest.mark.usefixtures("reused_onnx_export")


@pytest.mark.parametrize("dtype, elem_type", [("bfloat16", onnx.TensorProto.BFLOAT16),
                                              ("float32", onnx.TensorProto.FLOAT)])
def test_tensorrt_engine_is_built_from_a_graph_in_the_export_dtype(tiny_checkpoints, tmp_path, monkeypatch, dtype,
                                                                   elem_type):
    seen = {}

    def stand_in(onnx_path, engine_path, config, draft_len, max_batch_size=engine_shapes.ENGINE_MAX_BATCH_SIZE,
                 draft_blocks=None):
        graph = onnx.load(onnx_path, load_external_data=False)
        types = {value.name: value.type.tensor_type.elem_type for value in (*graph.graph.input, *graph.graph.output)}
        seen.update(path=onnx_path, past=types["past_key_0"], hidden=types["hidden_states"],
                    weights={init.data_type for init in graph.graph.initializer  # the checkpoint's tensors
                             if init.data_location == onnx.TensorProto.EXTERNAL},
                    plugins=sum(node.op_type == PLUGIN_OP for node in graph.graph.node))
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(b"stand-in engine")
        return tensorrt_engine.engine_record(config, draft_len, max_batch_size, draft_blocks, "stand-in",
                                             onnx_path.name, [])

    monkeypatch.setattr(build_module, "engine_skip_reasons",
                        lambda engine: {"engine": "not requested", "tensorrt": None})
    monkeypatch.setattr(tensorrt_engine, "build_tensorrt_engine", stand_in)
    out = tmp_path / "out"
    assert main(["build", str(tiny_checkpoints["qwen2"]), "-o", str(out), "--dtype", dtype, "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert seen["past"] == seen["hidden"] == elem_type and seen["weights"] == {elem_type}
    assert seen["plugins"] == layers
    assert manifest["engines"]["tensorrt"]["dtype"] == dtype
    # float32: onnx/'s graph; another dtype: the graph traced for TensorRT
    assert seen["path"].parent.name == ("onnx" if dtype == "float32" else "graph")
    assert not (out / "tensorrt" / "graph").exists()  # the intermediate graph is not part of OUT
    assert (out / "tensorrt" / "decode_step.engine").is_file()

"""The TensorRT engine of the plugin ONNX graph (export/tensorrt_engine.py): its plain-Python half.

Checked on CPU: the optimization profile covers exactly the graph's inputs with min <= opt <= max
shapes (batch, new tokens and past length dynamic; heads, head_dim and the 0-d layout scalars
fixed); the in-memory annotation of tidar::hybrid_attention nodes that lets TensorRT's ONNX parser
find the ahead-of-time plugin (the file on disk keeps the op's contract attributes only); and the
reason given where TensorRT or a GPU is missing. Building and running an engine needs TensorRT,
the plugin and a GPU: that test skips with the reason otherwise.
"""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch

from tidar.export.onnx_export import PLUGIN_DOMAIN, export_decode_step, input_names
from tidar.export.tensorrt_engine import (annotate_plugin_nodes, build_tensorrt_engine, network_flags,
                                          optimization_profile, unavailable_reason)


def test_profile_covers_every_input(tiny_backends):
    config = tiny_backends["qwen3"].config  # 1 KV head of 32, 2 layers, block size 16
    profile = optimization_profile(config, draft_len=4, max_batch_size=3)
    assert list(profile) == input_names(config.num_hidden_layers)
    for name, (low, opt, high) in profile.items():
        assert len(low) == len(opt) == len(high)
        assert all(a <= b <= c for a, b, c in zip(low, opt, high)), name
    assert profile["input_ids"] == ((1, 1), (1, 20), (3, 1023 + 4))
    assert profile["past_lens"] == ((1,), (1,), (3,))
    assert profile["causal_len"] == ((), (), ())
    assert profile["past_value_1"] == ((1, 1, 0, 32), (1, 1, 1024, 32), (3, 1, 1024, 32))
    k_of_b = optimization_profile(config, draft_len=4, max_batch_size=3, draft_blocks=1)  # 4 + 1 * 4 tokens
    assert k_of_b["input_ids"] == ((1, 1), (1, 8), (3, 1023 + 4))


def test_plugin_nodes_are_annotated_in_memory_only(tiny_backends, tmp_path):
    model = tiny_backends["qwen2"].model
    path = export_decode_step(model, tmp_path / "plugin.onnx", attention="plugin")
    graph = onnx.load(path, load_external_data=False)
    assert annotate_plugin_nodes(graph) == model.config.num_hidden_layers
    assert annotate_plugin_nodes(graph) == model.config.num_hidden_layers  # idempotent
    for node in (n for n in graph.graph.node if n.domain == PLUGIN_DOMAIN):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_namespace"] == b"tidar"
        assert attributes["aot"] == 1 and attributes["num_heads"] == model.config.num_attention_heads
    on_disk = onnx.load(path, load_external_data=False)
    assert not [a for n in on_disk.graph.node for a in n.attribute if a.name == "plugin_namespace"]


def test_network_is_strongly_typed():
    """NvInfer.h (10.13): NetworkDefinitionCreationFlag kSTRONGLY_TYPED = 1, kPREFER_JIT_PYTHON_PLUGINS
    = 2, kPREFER_AOT_PYTHON_PLUGINS = 3 (kEXPLICIT_BATCH = 0 is deprecated and implied)."""
    from types import SimpleNamespace

    trt = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1, PREFER_JIT_PYTHON_PLUGINS=2,
                                                                        PREFER_AOT_PYTHON_PLUGINS=3))
    assert network_flags(trt) == 0b1010


def test_build_and_run_need_tensorrt(tiny_checkpoints, tiny_backends, tmp_path):
    reason = unavailable_reason()
    if reason:
        assert isinstance(reason, str) and reason
        pytest.skip(f"building a TensorRT engine needs TensorRT, tidar's TensorRT plugin and a GPU: {reason}")
    from tidar.export.verify import greedy_mismatch
    from tidar.runtime.backends.engine_backend import TENSORRT_ENGINE, EngineBackend
    from tidar.runtime.tokenizer import Tokenizer

    from tidar.runtime.backends.base import HEAD_GRAPH

    model = tiny_backends["qwen2"].model
    # laid out as in a build: the backend applies the LM head weight of OUT/onnx/lm_head.onnx
    graph = export_decode_step(model, tmp_path / "onnx" / "plugin.onnx", attention="plugin",
                               head_path=tmp_path / HEAD_GRAPH)
    record = build_tensorrt_engine(graph, tmp_path / TENSORRT_ENGINE, model.config, draft_len=4)
    assert record["profile"]["batch"] == [1, 1, 8]
    engine = EngineBackend.tensorrt(tmp_path, model.config)
    tokenizer = Tokenizer(tiny_checkpoints["qwen2"])
    assert greedy_mismatch(tiny_backends["qwen2"], engine, tokenizer, (0, 4, 16)) is None


@pytest.mark.parametrize("name", ["tensorrt", "trtllm"])
def test_engine_backends_explain_what_is_missing(tmp_path, tiny_checkpoints, name):
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.checkpoint import CheckpointError

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the missing-package path cannot be reached")
    with pytest.raises(CheckpointError, match=r"needs the `tensorrt|tensorrt_llm` package|no CUDA device"):
        load_backend(name, tiny_checkpoints["qwen2"])

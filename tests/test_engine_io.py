"""The two engines of runtime/backends/engine_backend.py without a GPU: their I/O contract, and the
step each one computes, executed.

I/O: every feed and output buffer takes its dtype and shape from the engine's declared tensors,
for the I/O each exporter declares (the ONNX graph's for the ONNX -> TensorRT engine: int64
indices, hidden states in the graph's dtype; `trtllm_model.input_specs` / `output_specs` for the
TensorRT-LLM engine: int32 indices, hidden states and K/V in the model dtype). TensorRT's runtime
needs a GPU, so the stand-in `fakes.tensorrt_engine.DeclaredEngine` plays ICudaEngine and its
execution context, and checks every bound buffer against the declaration.

Computation: each stand-in engine computes what its engine is built from.
- ONNX -> TensorRT: the plugin graph (export/tensorrt_engine.py parses decode_step_plugin.onnx),
  run by onnx's reference evaluator, every node evaluated, each `tidar::hybrid_attention` node by
  the plugin stand-in `fakes.hybrid_attention_op` (a dense mask; the node's attributes checked
  against the tensors and used for the head grouping and the softmax scale).
- TensorRT-LLM: export/trtllm_model.py's network on the TensorRT-LLM stand-in
  `fakes.tensorrt_llm_network`, with the weights of the checkpoint's rank0.safetensors.
The oracle is the dense-mask reference model (tidar.runtime.model, fp32, eager attention): hidden
states and presents of a decode step over a filled cache, and greedy tokens. Tolerances: fp32
engines 1e-4 of the largest hidden-state magnitude (measured differences are about 1e-6); bf16
2e-2 (bf16 weights, activations and K/V).

The LM head is not in either engine: the backend applies it to the rows the loop picks, with the
weight each engine was built from (onnx/lm_head.onnx's, trtllm/rank0.safetensors'), checked
against the model's own head.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from fakes import hybrid_attention_op
from fakes.tensorrt_engine import DeclaredEngine, EnumValue
from fakes.tensorrt_llm_network import load_network
from tidar.export.engine_shapes import dimension_ranges, input_shapes
from tidar.export.onnx_export import PLUGIN_DOMAIN, PLUGIN_OP, default_head_path, export_decode_step
from tidar.export.trtllm_checkpoint import convert
from tidar.export.trtllm_model import builder_ranges, input_specs, output_specs
from tidar.export.verify import greedy_mismatch
from tidar.runtime.backends import engine_backend
from tidar.runtime.backends.engine_backend import EngineBackend, engine_io, onnx_head_weight, torch_dtype, trtllm_head_weight
from tidar.runtime.layout import Layout
from tidar.runtime.model import gather_rows
from tidar.runtime.tokenizer import Tokenizer

# TensorRT's ONNX parser keeps the graph's I/O types: ONNX element type -> tensorrt.DataType name
ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32"}
SPEC_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int32": "INT32", "int64": "INT64"}
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2
FAMILIES = ("qwen2", "qwen3", "llama")


def recording_bind(monkeypatch, engine: DeclaredEngine):
    """Let the stand-in see the tensors EngineBackend binds (to check them against the addresses)."""
    real = EngineBackend.bind

    def bind(self, *args):
        engine.bound = real(self, *args)
        return engine.bound
    monkeypatch.setattr(EngineBackend, "bind", bind)


def filled_caches(reference, candidate, lengths, capacity: int = 64, seed: int = 0):
    """(reference cache, candidate cache) holding the same random K/V (in each one's dtype) and
    committed `lengths`."""
    generator = torch.Generator().manual_seed(seed)
    caches = reference.new_cache(len(lengths), capacity), candidate.new_cache(len(lengths), capacity)
    keys = torch.randn(caches[0].keys.shape, generator=generator).to(caches[1].keys.dtype)
    values = torch.randn(caches[0].values.shape, generator=generator).to(caches[1].values.dtype)
    for cache in caches:
        cache.keys.copy_(keys)
        cache.values.copy_(values)
        cache.commit(lengths)
    return caches


def assert_step_matches_the_reference(reference, candidate, tolerance: float, draft_len: int = 4):
    """One decode step over a filled cache: the candidate's hidden states and the K/V it writes are
    the reference's within `tolerance` of the largest magnitude."""
    ref_cache, cache = filled_caches(reference, candidate, [5, 9])
    layout = Layout.decode(draft_len)
    ids = torch.randint(0, reference.config.vocab_size, (2, layout.num_new), generator=torch.Generator().manual_seed(1))
    expected = reference.hidden_states(ids, layout, ref_cache)
    got = candidate.hidden_states(ids, layout, cache)
    scale = expected.abs().max().item()
    assert (got.float() - expected).abs().max().item() <= tolerance * scale
    for row, length in enumerate([5, 9]):
        written = slice(length, length + layout.num_new)
        for ours, theirs in ((cache.keys, ref_cache.keys), (cache.values, ref_cache.values)):
            difference = (ours[:, row, :, written].float() - theirs[:, row, :, written]).abs().max().item()
            assert difference <= tolerance * theirs[:, row, :, written].abs().max().item()


# ---------------------------------------------------------------- ONNX -> TensorRT: the plugin graph
@pytest.fixture(scope="module")
def plugin_graph(tiny_backends, tmp_path_factory):
    """Path of the plugin decode step of the tiny qwen2 model (fp32) and its LM-head graph beside it."""
    return export_decode_step(tiny_backends["qwen2"].model, tmp_path_factory.mktemp("io") / "plugin.onnx",
                              attention="plugin")


class PluginGraphRunner:
    """The plugin graph under onnx's reference evaluator, counting the hybrid-attention nodes run."""

    def __init__(self, path):
        self.nodes = 0
        runner = self

        class hybrid_attention(hybrid_attention_op.hybrid_attention):  # noqa: N801 (the node's op type)
            def _run(self, *args, **attributes):
                runner.nodes += 1
                return super()._run(*args, **attributes)

        self.evaluator = ReferenceEvaluator(str(path), new_ops=[hybrid_attention])
        self.outputs = list(self.evaluator.output_names)

    def __call__(self, feeds):
        wanted = {n: v for n, v in feeds.items() if n in self.evaluator.input_names}
        return dict(zip(self.outputs, self.evaluator.run(None, wanted)))


def onnx_declared(path) -> dict:
    """The I/O of the ONNX -> TensorRT engine: the graph's declared inputs and outputs."""
    graph = onnx.load(path, load_external_data=False).graph
    declared = {}
    for value, is_input in [(v, True) for v in graph.input] + [(v, False) for v in graph.output]:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        declared[value.name] = (is_input, ONNX_TO_TRT[tensor.elem_type], dims)
    return declared


def test_tensorrt_engine_runs_the_plugin_graph(plugin_graph, tiny_backends, tiny_checkpoints, monkeypatch):
    """The ONNX -> TensorRT engine (int64 indices, fp32 hidden states) computing the plugin graph,
    and the head graph's weight: a decode step's hidden states and K/V are the reference's, and
    greedy tokens through EngineBackend equal the torch backend's, with every buffer as the engine
    declares it and every layer's attention through the plugin node."""
    reference = tiny_backends["qwen2"]
    config = reference.config
    graph = onnx.load(plugin_graph, load_external_data=False).graph
    plugin_nodes = [n for n in graph.node if (n.domain, n.op_type) == (PLUGIN_DOMAIN, PLUGIN_OP)]
    assert len(plugin_nodes) == config.num_hidden_layers
    declared = onnx_declared(plugin_graph)
    assert declared["input_ids"][1] == "INT64" and declared["hidden_states"][1] == "FLOAT"
    assert "logits" not in declared  # the LM head is not in the engine
    # the graph's symbolic dims, renamed to the profile's dimensions by their positions
    rename = {"input_ids": ("batch", "new"), "past_lens": ("batch",),
              "hidden_states": ("batch", "new", config.hidden_size)}
    for name, (is_input, dtype, dims) in declared.items():
        if name.startswith(("past_key", "past_value")):
            dims = ("batch", dims[1], "past", dims[3])
        elif name.startswith("present"):
            dims = ("batch", dims[1], "kv", dims[3])
        declared[name] = (is_input, dtype, rename.get(name, dims))
    assert {n for n, d in declared.items() if d[0]} == set(input_shapes(config, 4))
    runner = PluginGraphRunner(plugin_graph)
    engine = DeclaredEngine(declared, dimension_ranges(config, 4), runner)
    recording_bind(monkeypatch, engine)
    head = onnx_head_weight(default_head_path(plugin_graph), config)
    assert torch.equal(head, reference.model.lm_head.weight)  # tied: the embedding's values
    backend = EngineBackend(engine, config, "tensorrt", head, device="cpu")
    assert backend.dtype == torch.float32
    assert_step_matches_the_reference(reference, backend, FP32_TOLERANCE)
    assert greedy_mismatch(reference, backend, Tokenizer(tiny_checkpoints["qwen2"]), (0, 4)) is None
    assert engine.executions > 1 and runner.nodes == engine.executions * config.num_hidden_layers


def test_a_miswired_plugin_attribute_is_caught(plugin_graph, tiny_backends, tmp_path):
    """The check above would see a plugin node whose attributes disagree with the model: a wrong
    scale changes the step, a wrong head count is refused by the plugin's shape check."""
    reference = tiny_backends["qwen2"]
    config = reference.config
    layout, generator = Layout.decode(2), np.random.default_rng(0)
    feeds = {"input_ids": generator.integers(0, config.vocab_size, (1, layout.num_new)), "past_lens": np.array([3]),
             **{name: np.array(value) for name, value in layout.kernel_scalars().items()}}
    for layer in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{layer}"] = generator.standard_normal(
                (1, config.num_key_value_heads, 3, config.head_dim)).astype(np.float32)
    good = PluginGraphRunner(plugin_graph)(feeds)["hidden_states"]
    for attribute, value, effect in (("scale", 1.0, "changes"), ("num_kv_heads", 1, "refused")):
        model = onnx.load(plugin_graph)
        for node in model.graph.node:
            if node.op_type == PLUGIN_OP:
                for field in node.attribute:
                    if field.name == attribute:
                        field.CopyFrom(onnx.helper.make_attribute(attribute, value))
        broken = tmp_path / f"{attribute}.onnx"
        onnx.save(model, broken)
        if effect == "refused":
            with pytest.raises(ValueError, match="num_kv_heads"):
                PluginGraphRunner(broken)(feeds)
        else:
            assert np.abs(PluginGraphRunner(broken)(feeds)["hidden_states"] - good).max() > 1e-3


# ---------------------------------------------------------------- TensorRT-LLM: trtllm_model.py's network
def trtllm_declared(config: dict) -> dict:
    """The I/O of the TensorRT-LLM engine, as trtllm_model declares it to the builder."""
    declared = {s.name: (True, SPEC_TO_TRT[s.dtype], s.dims) for s in input_specs(config)}
    declared.update({s.name: (False, SPEC_TO_TRT[s.dtype], s.dims) for s in output_specs(config)})
    return declared


def trtllm_backend(folder, reference, monkeypatch, network=None) -> tuple[EngineBackend, DeclaredEngine]:
    """EngineBackend over a stand-in engine that runs the network of the checkpoint `folder`."""
    checkpoint = json.loads((folder / "config.json").read_text())
    network = network or load_network(folder)
    engine = DeclaredEngine(trtllm_declared(checkpoint), builder_ranges(checkpoint, 8, 1023, 1024 + 20, 4), network)
    recording_bind(monkeypatch, engine)
    head = trtllm_head_weight(folder / "rank0.safetensors", reference.config)
    return EngineBackend(engine, reference.config, "trtllm", head, device="cpu"), engine


@pytest.mark.parametrize("family", FAMILIES)
def test_trtllm_network_computes_the_reference_step(family, tiny_checkpoints, tiny_backends, tmp_path, monkeypatch):
    """trtllm_model.py's network in fp32 (qkv bias and tied head for qwen2, q/k norms for qwen3,
    llama3 RoPE scaling for llama): a decode step's hidden states and K/V are the reference's,
    and greedy tokens through EngineBackend equal the torch backend's."""
    reference = tiny_backends[family]
    backend, engine = trtllm_backend(convert(tiny_checkpoints[family], tmp_path, 1, "float32"), reference,
                                     monkeypatch)
    assert backend.dtype == torch.float32
    assert_step_matches_the_reference(reference, backend, FP32_TOLERANCE)
    assert greedy_mismatch(reference, backend, Tokenizer(tiny_checkpoints[family]), (0, 4)) is None
    assert engine.executions > 1


@pytest.fixture(scope="module")
def trtllm_folder(tiny_checkpoints, tmp_path_factory):
    """The TensorRT-LLM checkpoint (tp 1, bf16) of the tiny qwen2 model."""
    return convert(tiny_checkpoints["qwen2"], tmp_path_factory.mktemp("trtllm"), 1, "bfloat16")


@pytest.fixture(scope="module")
def trtllm_config(trtllm_folder):
    return json.loads((trtllm_folder / "config.json").read_text())


def test_trtllm_engine_io_int32_indices_bf16_hidden_states(trtllm_config, trtllm_folder, tiny_backends, monkeypatch):
    """The TensorRT-LLM engine (int32 indices and position ids, bf16 hidden states and K/V) and
    rank0's LM head: every feed is cast to the declared dtype (ids keep their values), the
    hidden states are the engine's buffer and the network's output, within bf16 rounding of the
    reference's, logits come back float32 from the bf16 head (within bf16 rounding of the fp32
    head on the same rows) and the cache holds the engine's presents."""
    reference = tiny_backends["qwen2"]
    config = reference.config
    declared = trtllm_declared(trtllm_config)
    assert declared["input_ids"][1] == "INT32" and declared["causal_len"][1] == "INT32"
    assert declared["hidden_states"][1] == "BF16" and declared["present_key_0"][1] == "BF16"
    assert "logits" not in declared
    seen = {}
    network = load_network(trtllm_folder)

    def run(feeds):
        seen.update(feeds)
        return network(feeds)

    backend, engine = trtllm_backend(trtllm_folder, reference, monkeypatch, run)
    assert torch.equal(trtllm_head_weight(trtllm_folder / "rank0.safetensors", config),
                       reference.model.lm_head.weight.bfloat16())  # tied: the embedding, cut to the vocabulary
    assert backend.dtype == torch.bfloat16
    ref_cache, cache = filled_caches(reference, backend, [5, 9])
    layout = Layout.decode(4)
    ids = torch.randint(0, config.vocab_size, (2, layout.num_new))
    hidden = backend.hidden_states(ids, layout, cache)
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (2, layout.num_new, config.hidden_size)
    assert hidden.data_ptr() == engine.bound["hidden_states"].data_ptr()  # the engine's buffer, not a copy
    assert engine.bound["input_ids"].dtype == torch.int32 and np.array_equal(seen["input_ids"], ids.numpy())
    assert np.array_equal(seen["position_ids"], layout.position_ids(cache.lengths).numpy())
    assert {n: int(seen[n]) for n in layout.kernel_scalars()} == layout.kernel_scalars()
    assert torch.equal(cache.keys[0, :, :, :9 + layout.num_new], engine.bound["present_key_0"])
    assert torch.equal(hidden, network(seen)["hidden_states"])
    expected = reference.hidden_states(ids, layout, ref_cache)
    assert (hidden.float() - expected).abs().max().item() <= BF16_TOLERANCE * expected.abs().max().item()
    rows = torch.tensor([[0, 3, 7], [4, 11, 19]])
    logits = backend.head(gather_rows(hidden, rows))
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, config.vocab_size)
    with torch.no_grad():
        oracle = reference.model.lm_head(gather_rows(hidden, rows).float())
    assert (logits - oracle).abs().max().item() < BF16_TOLERANCE * oracle.abs().max().item()


def test_shape_outside_the_profile_is_named(trtllm_config, tiny_backends):
    config = tiny_backends["qwen2"].config
    ranges = builder_ranges(trtllm_config, 2, 1023, 1024 + 20, 4)  # at most 2 rows
    head = torch.zeros(config.vocab_size, config.hidden_size)
    backend = EngineBackend(DeclaredEngine(trtllm_declared(trtllm_config), ranges, None), config, "trtllm", head,
                            device="cpu")
    cache = backend.new_cache(3, 64)
    with pytest.raises(ValueError, match=r"input 'input_ids' of shape \(3, 20\) is outside the engine's "
                                         r"optimization profile"):
        backend.forward(torch.zeros(3, 20, dtype=torch.long), Layout.decode(4), cache)


def test_dtype_map_refuses_what_it_cannot_bind():
    for name, dtype in (("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
                        ("INT32", torch.int32), ("INT64", torch.int64), ("BOOL", torch.bool)):
        assert torch_dtype(EnumValue("DataType", name)) == dtype
    assert torch_dtype("DataType.INT32") == torch.int32  # str() of a pybind11 enum value
    with pytest.raises(ValueError, match="FP8"):
        torch_dtype(EnumValue("DataType", "FP8"))
    engine = DeclaredEngine({"input_ids": (True, "INT4", ("batch", "new"))}, {}, None)
    with pytest.raises(ValueError, match="INT4"):
        engine_io(engine)


def test_engine_without_hidden_states_or_with_a_wrong_head_is_named(trtllm_config, tiny_backends):
    """An engine built when the LM head was inside it (output `logits`) is refused with the
    advice to rebuild; a head weight of the wrong shape is refused with both shapes."""
    config = tiny_backends["qwen2"].config
    ranges = builder_ranges(trtllm_config, 2, 1023, 1024 + 20, 4)
    head = torch.zeros(config.vocab_size, config.hidden_size)
    old = trtllm_declared(trtllm_config)
    old["logits"] = (False, "FLOAT", ("batch", "new", config.vocab_size))
    del old["hidden_states"]
    with pytest.raises(engine_backend.EngineUnavailable, match="no tensor hidden_states.*build it again"):
        EngineBackend(DeclaredEngine(old, ranges, None), config, "trtllm", head, device="cpu")
    padded = (config.vocab_size + 6, config.hidden_size)  # e.g. a head not cut to the vocabulary
    with pytest.raises(engine_backend.EngineUnavailable, match=rf"shape \({padded[0]}, {padded[1]}\), config.json"):
        EngineBackend(DeclaredEngine(trtllm_declared(trtllm_config), ranges, None), config, "trtllm",
                      torch.zeros(padded), device="cpu")

"""The TensorRT-LLM model definition (export/trtllm_model.py): its plain-Python half on CPU.

Checked without TensorRT-LLM: the weights the model declares are exactly, name and shape, the
tensors of every rank file `trtllm_checkpoint.convert` writes (families qwen2 / qwen3 / llama,
tp 1, 2, 4); rank-local head counts (KV heads duplicated when fewer than ranks); the network
inputs (names, dtypes, static and dynamic dims, TensorRT-LLM dim ranges) against the ONNX graph's
inputs; and the engine sizes. The model class itself needs TensorRT-LLM and a GPU host: its
test skips with the reason when tensorrt_llm is absent.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from fakes.tensorrt_llm_network import tensorrt_module
from tidar.export.engine_shapes import DimRange, dimension_ranges, engine_limits
from tidar.export.onnx_export import input_names
from tidar.export.onnx_export import output_names as onnx_output_names
from tidar.export.trtllm_checkpoint import convert
from tidar.export.trtllm_model import (ARCHITECTURE, TRTLLM_IMPORT_ERROR, allow_plugin_v3_layers,
                                       builder_ranges, declared_weights, input_specs, output_names, output_specs,
                                       rank_sizes)
from tidar.runtime.config import TiDARConfig

FAMILIES = ("qwen2", "qwen3", "llama")
TP_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def trtllm_checkpoints(tiny_checkpoints, tmp_path_factory):
    """{(family, tp): TRT-LLM checkpoint folder} for every family and tp."""
    return {(family, tp): convert(tiny_checkpoints[family], tmp_path_factory.mktemp(f"{family}-tp{tp}"), tp)
            for family in FAMILIES for tp in TP_SIZES}


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_declared_weights_are_the_rank_files(family, tp, trtllm_checkpoints):
    folder = trtllm_checkpoints[family, tp]
    declared = declared_weights(read_config(folder))
    for rank in range(tp):
        with safe_open(folder / f"rank{rank}.safetensors", framework="pt") as handle:
            stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        assert set(declared) == set(stored), f"rank {rank}: {sorted(set(declared) ^ set(stored))[:3]}"
        assert declared == stored


def test_rank_local_sizes(trtllm_checkpoints, tiny_checkpoints):
    qwen3 = TiDARConfig.from_file(tiny_checkpoints["qwen3"])  # 4 query heads, 1 KV head, head_dim 32
    for tp in TP_SIZES:
        sizes = rank_sizes(read_config(trtllm_checkpoints["qwen3", tp]))
        assert sizes.num_heads == 4 // tp and sizes.num_kv_heads == 1  # the single KV head is duplicated
        assert sizes.qkv_rows == (4 // tp + 2) * qwen3.head_dim
        assert sizes.intermediate_size == qwen3.intermediate_size // tp and sizes.qk_layernorm
    llama = rank_sizes(read_config(trtllm_checkpoints["llama", 4]))
    assert (llama.num_heads, llama.num_kv_heads, llama.qkv_bias) == (1, 1, False)
    qwen2 = rank_sizes(read_config(trtllm_checkpoints["qwen2", 2]))
    assert (qwen2.num_heads, qwen2.num_kv_heads, qwen2.qkv_bias, qwen2.qk_layernorm) == (2, 1, True, False)


def test_unsplittable_config_names_the_field(trtllm_checkpoints):
    config = read_config(trtllm_checkpoints["qwen2", 1])
    config["mapping"]["tp_size"] = 3
    with pytest.raises(ValueError, match="num_attention_heads"):
        rank_sizes(config)


def test_inputs_match_the_onnx_decode_step(trtllm_checkpoints):
    config = read_config(trtllm_checkpoints["qwen3", 2])
    specs = input_specs(config)
    names = [spec.name for spec in specs]
    assert [n for n in names if n != "position_ids"] == input_names(config["num_hidden_layers"])
    by_name = {spec.name: spec for spec in specs}
    assert by_name["input_ids"].dims == ("batch", "new") and by_name["input_ids"].dtype == "int32"
    assert by_name["past_lens"].shape() == [-1] and by_name["causal_len"].shape() == []
    assert by_name["past_key_1"].dims == ("batch", 1, "past", 32)  # rank-local KV heads
    assert by_name["past_key_1"].dtype == config["dtype"]
    ranges = builder_ranges(config, max_batch_size=4, max_input_len=100, max_seq_len=400, max_draft_len=4)
    dim_range = by_name["past_value_0"].dim_range(ranges)
    assert list(dim_range) == ["batch", "past_value_0_1", "past", "past_value_0_3"]
    assert dim_range["batch"] == [[1, 1, 4]] and dim_range["past"] == [[0, 380, 380]]  # 400 - one step of 20
    assert dim_range["past_value_0_1"] == [1]
    assert by_name["causal_len"].dim_range(ranges) is None
    assert ranges["new"].opt == 20  # a decode step of draft length 4: 4 * 5 tokens
    config["tidar"]["draft_len"] = 2  # what `tidar-export build --draft-len 2` sets before building
    assert builder_ranges(config, 4, 100, 400)["new"].opt == 6
    config["tidar"]["draft_len"] = 0  # AR steps: an explicit 0 is kept, not replaced by the block size
    assert builder_ranges(config, 4, 100, 400)["new"].opt == 1
    assert output_names(config)[:3] == ["hidden_states", "present_key_0", "present_value_0"]


def test_engine_sizes(tiny_checkpoints):
    config = TiDARConfig.from_file(tiny_checkpoints["qwen2"])  # max_position_embeddings 1024, block 16
    ranges = dimension_ranges(config, draft_len=4)
    assert ranges["batch"] == DimRange(1, 1, 8)
    assert ranges["new"] == DimRange(1, 20, 1023 + 4)  # a decode step of b=4 is 4 * 5 tokens
    assert ranges["past"] == DimRange(0, 1024, 1024)
    limits = engine_limits(config, 16)
    assert limits == {"max_batch_size": 8, "max_input_len": 1023, "max_seq_len": 1024 + 272,
                      "max_num_tokens": max(1023 + 16, 8 * 272)}
    with pytest.raises(ValueError, match="min <= opt <= max"):
        DimRange(2, 1, 3)


def test_engine_sizes_of_a_k_of_b_step(tiny_checkpoints):
    """k < b mask blocks (docs/design.md §3.4): a step is b + k*b tokens per row, which is what the
    profile is tuned for and what the KV cache and token budget must hold beyond the past."""
    config = TiDARConfig.from_file(tiny_checkpoints["qwen2"])
    assert dimension_ranges(config, 16, draft_blocks=2)["new"] == DimRange(1, 16 + 2 * 16, 1023 + 16)
    assert dimension_ranges(config, 4, draft_blocks=1)["new"].opt == 8
    limits = engine_limits(config, 16, max_batch_size=64, draft_blocks=2)
    assert limits["max_seq_len"] == 1024 + 48 and limits["max_num_tokens"] == 64 * 48
    assert engine_limits(config, 16, draft_blocks=16) == engine_limits(config, 16)
    with pytest.raises(ValueError, match="draft_blocks"):
        engine_limits(config, 4, draft_blocks=5)


def test_outputs_declare_model_dtype_hidden_states_and_presents(trtllm_checkpoints):
    """The network ends at the final norm (the runtime applies the LM head to the rows it picks):
    hidden states of every new token and the presents, all in the model dtype; no logits."""
    config = read_config(trtllm_checkpoints["qwen3", 2])
    specs = {spec.name: spec for spec in output_specs(config)}
    assert list(specs) == output_names(config) and "logits" not in specs
    assert specs["hidden_states"].dtype == config["dtype"]
    assert specs["hidden_states"].dims == ("batch", "new", config["hidden_size"])
    assert output_names(config) == onnx_output_names(config["num_hidden_layers"], "plugin")  # both engines: one contract
    assert specs["present_value_1"].dtype == config["dtype"]
    assert specs["present_value_1"].dims == ("batch", 1, "kv", 32)


def test_one_definition_of_the_maximum_past(tiny_checkpoints, trtllm_checkpoints):
    """The TensorRT profile and the TensorRT-LLM builder (which gets engine_limits' max_seq_len)
    agree on the longest past."""
    config = TiDARConfig.from_file(tiny_checkpoints["qwen2"])
    trtllm = read_config(trtllm_checkpoints["qwen2", 1])
    for draft_len, blocks in ((0, None), (4, None), (16, None), (16, 2), (4, 1)):
        trtllm["tidar"]["draft_len"] = draft_len  # as `tidar-export build` writes it into trtllm/config.json
        trtllm["tidar"]["draft_blocks"] = blocks
        limits = engine_limits(config, draft_len, draft_blocks=blocks)
        ranges = builder_ranges(trtllm, limits["max_batch_size"], limits["max_input_len"], limits["max_seq_len"],
                                draft_len)
        assert ranges == dimension_ranges(config, draft_len, draft_blocks=blocks)
        assert ranges["past"].max == config.max_position_embeddings


def test_graph_rewriting_knows_the_python_plugin_layer():
    """tensorrt_llm.graph_rewriting.Layer.as_layer raises NotImplementedError for a layer type
    missing from TRT_LAYER_TYPE_TO_LAYER; TensorRT-LLM 1.2's table lacks PLUGIN_V3 (the layer
    type of Python plugins), so the model module adds it."""
    trt = tensorrt_module()  # TensorRT's compiled module does not load here

    class Layer:  # the table as TensorRT-LLM 1.2 ships it (the part that matters)
        TRT_LAYER_TYPE_TO_LAYER = {trt.LayerType.PLUGIN_V2: trt.IPluginV2Layer}

    allow_plugin_v3_layers(Layer, trt)
    allow_plugin_v3_layers(Layer, trt)  # idempotent
    assert Layer.TRT_LAYER_TYPE_TO_LAYER == {trt.LayerType.PLUGIN_V2: trt.IPluginV2Layer,
                                             trt.LayerType.PLUGIN_V3: trt.IPluginV3Layer}
    del trt.IPluginV3Layer  # a tensorrt without that binding
    Layer.TRT_LAYER_TYPE_TO_LAYER.pop(trt.LayerType.PLUGIN_V3)
    allow_plugin_v3_layers(Layer, trt)
    assert Layer.TRT_LAYER_TYPE_TO_LAYER[trt.LayerType.PLUGIN_V3] is trt.ILayer


def test_model_class_needs_tensorrt_llm(trtllm_checkpoints):
    if TRTLLM_IMPORT_ERROR is not None:
        pytest.skip(f"the TensorRT-LLM model class needs TensorRT-LLM 1.2.x and a GPU host: {TRTLLM_IMPORT_ERROR}")
    from tensorrt_llm.models import MODEL_MAP

    from tidar.export.trtllm_model import TiDARForCausalLM

    assert MODEL_MAP[ARCHITECTURE] is TiDARForCausalLM
    import tensorrt as trt
    from tensorrt_llm.graph_rewriting import Layer

    assert trt.LayerType.PLUGIN_V3 in Layer.TRT_LAYER_TYPE_TO_LAYER  # builder.build's optimize() would refuse it
    folder = trtllm_checkpoints["qwen2", 2]
    model = TiDARForCausalLM.from_checkpoint(str(folder), rank=1)
    assert {name for name, _ in model.named_parameters()} == set(declared_weights(read_config(folder)))

"""Engine I/O contract of runtime/engine_backend.py: every feed and output buffer takes its dtype
and shape from the engine's declared tensors, for the I/O each exporter declares.

TensorRT's runtime needs a GPU, so `DeclaredEngine` stands in for ICudaEngine and its execution
context only. It declares exactly the I/O an exporter declares: the ONNX graph's inputs and
outputs for the ONNX -> TensorRT engine (int64 indices, hidden states in the graph's dtype), or
`trtllm_model.input_specs` / `output_specs` for the TensorRT-LLM engine (int32 indices, hidden
states and K/V in the model dtype). Like TensorRT, it refuses input shapes outside the engine's
optimization profile (set_input_shape returns False) and derives each output's shape from the
input shapes. Unlike TensorRT (whose set_tensor_address takes a bare pointer and checks
nothing), its execute checks that every bound address is a buffer of the declared dtype and
shape, then computes the decode step with ONNX Runtime on the standard ONNX graph (the
function both engines compute), converting to and from the declared dtypes.

The LM head is not in either engine: the backend applies it to the rows the loop picks, with the
weight each engine was built from (onnx/lm_head.onnx's, trtllm/rank0.safetensors'), checked
against the model's own head.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tidar.export.engine_shapes import dimension_ranges, input_shapes
from tidar.export.onnx_export import default_head_path, export_decode_step
from tidar.export.trtllm_checkpoint import convert
from tidar.export.trtllm_model import builder_ranges, input_specs, output_specs
from tidar.runtime.backends import engine_backend
from tidar.runtime.backends.engine_backend import EngineBackend, engine_io, onnx_head_weight, torch_dtype, trtllm_head_weight
from tidar.runtime.model import gather_rows
from tidar.runtime.backends.onnx_backend import OnnxRuntimeBackend
from tidar.runtime.layout import Layout

# TensorRT's ONNX parser keeps the graph's I/O types: ONNX element type -> tensorrt.DataType name
ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32"}
SPEC_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int32": "INT32", "int64": "INT64"}


class _Enum:
    """A TensorRT enum value (what `.name` of tensorrt.DataType / TensorIOMode members gives)."""

    def __init__(self, kind: str, name: str):
        self.name = name
        self.kind = kind

    def __repr__(self):
        return f"{self.kind}.{self.name}"


class DeclaredEngine:
    """ICudaEngine + IExecutionContext with declared I/O (see the module docstring).

    `declared`: {name: (is_input, DataType name, dims)}; dims are ints or names of dimensions
    ("batch", "new", "past", "kv" = past + new). `ranges`: {dimension: DimRange} of the profile.
    `run`: {input name: np.ndarray (float32 / int64)} -> {output name: np.ndarray}."""

    def __init__(self, declared: dict, ranges: dict, run):
        self.declared, self.ranges, self.run = declared, ranges, run
        self.num_io_tensors = len(declared)
        self.shapes, self.addresses, self.bound = {}, {}, {}
        self.executions = 0

    # ICudaEngine
    def get_tensor_name(self, index):
        return list(self.declared)[index]

    def get_tensor_mode(self, name):
        return _Enum("TensorIOMode", "INPUT" if self.declared[name][0] else "OUTPUT")

    def get_tensor_dtype(self, name):
        return _Enum("DataType", self.declared[name][1])

    def create_execution_context(self):
        return self

    # IExecutionContext
    def set_input_shape(self, name, shape) -> bool:
        dims = self.declared[name][2]
        if len(shape) != len(dims):
            return False
        sizes = {}
        for dim, size in zip(dims, shape):
            if isinstance(dim, int):
                if size != dim:
                    return False
            elif not self.ranges[dim].min <= size <= self.ranges[dim].max or sizes.setdefault(dim, size) != size:
                return False
        self.shapes[name] = tuple(shape)
        return True

    def _sizes(self) -> dict:
        sizes = {}
        for name, shape in self.shapes.items():
            sizes.update({dim: size for dim, size in zip(self.declared[name][2], shape) if isinstance(dim, str)})
        sizes["kv"] = sizes["past"] + sizes["new"]
        return sizes

    def get_tensor_shape(self, name):
        if self.declared[name][0]:
            return self.shapes[name]
        sizes = self._sizes()
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.declared[name][2])

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def execute_async_v3(self, stream) -> bool:
        assert set(self.addresses) == set(self.declared), "every I/O tensor needs an address"
        for name, (_, dtype, _) in self.declared.items():
            tensor = self.bound[name]
            assert tensor.data_ptr() == self.addresses[name], f"{name}: bound address is not the buffer"
            assert tensor.dtype == engine_backend.TORCH_DTYPES[dtype], \
                f"{name}: a {tensor.dtype} buffer bound to an engine tensor declared {dtype}"
            assert tuple(tensor.shape) == tuple(self.get_tensor_shape(name)), \
                f"{name}: buffer of shape {tuple(tensor.shape)}, engine shape {self.get_tensor_shape(name)}"
            assert tensor.is_contiguous(), f"{name}: not dense"
        feeds = {name: (t.to(torch.int64) if not t.is_floating_point() else t.float()).numpy()
                 for name, t in self.bound.items() if self.declared[name][0]}
        for name, value in self.run(feeds).items():
            self.bound[name].copy_(torch.from_numpy(value))
        self.executions += 1
        return True


@pytest.fixture(scope="module")
def standard_graph(tiny_backends, tmp_path_factory):
    """(path, ONNX Runtime session) of the standard decode step of the tiny qwen2 model (fp32)."""
    path = export_decode_step(tiny_backends["qwen2"].model, tmp_path_factory.mktemp("io") / "step.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return path, onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(session):
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}

    def run(feeds):
        return dict(zip(names, session.run(names, {n: v for n, v in feeds.items() if n in wanted})))
    return run


def recording_bind(monkeypatch, engine: DeclaredEngine):
    """Let the stand-in see the tensors EngineBackend binds (to check them against the addresses)."""
    real = EngineBackend.bind

    def bind(self, *args):
        engine.bound = real(self, *args)
        return engine.bound
    monkeypatch.setattr(EngineBackend, "bind", bind)


def onnx_declared(path) -> dict:
    """The I/O of the ONNX -> TensorRT engine: the graph's declared inputs and outputs."""
    graph = onnx.load(path, load_external_data=False).graph
    declared = {}
    for value, is_input in [(v, True) for v in graph.input] + [(v, False) for v in graph.output]:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        declared[value.name] = (is_input, ONNX_TO_TRT[tensor.elem_type], dims)
    return declared


def test_tensorrt_engine_io_from_the_onnx_graph(standard_graph, tiny_backends, tiny_checkpoints, monkeypatch):
    """The ONNX -> TensorRT engine (int64 indices, fp32 hidden states) and the head graph's weight:
    greedy tokens through EngineBackend equal the torch backend's, with every buffer as the
    engine declares it."""
    from tidar.export.verify import greedy_mismatch
    from tidar.runtime.tokenizer import Tokenizer

    path, session = standard_graph
    declared = onnx_declared(path)
    config = tiny_backends["qwen2"].config
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
    engine = DeclaredEngine(declared, dimension_ranges(config, 4), onnx_runner(session))
    recording_bind(monkeypatch, engine)
    head = onnx_head_weight(default_head_path(path), config)
    assert torch.equal(head, tiny_backends["qwen2"].model.lm_head.weight)  # tied: the embedding's values
    backend = EngineBackend(engine, config, "tensorrt", head, device="cpu")
    assert backend.dtype == torch.float32
    assert greedy_mismatch(tiny_backends["qwen2"], backend, Tokenizer(tiny_checkpoints["qwen2"]), (0, 4)) is None
    assert engine.executions > 0


@pytest.fixture(scope="module")
def trtllm_folder(tiny_checkpoints, tmp_path_factory):
    """The TensorRT-LLM checkpoint (tp 1, bf16) of the tiny qwen2 model."""
    return convert(tiny_checkpoints["qwen2"], tmp_path_factory.mktemp("trtllm"), 1, "bfloat16")


@pytest.fixture(scope="module")
def trtllm_config(trtllm_folder):
    return json.loads((trtllm_folder / "config.json").read_text())


def trtllm_declared(config: dict) -> dict:
    """The I/O of the TensorRT-LLM engine, as trtllm_model declares it to the builder."""
    declared = {s.name: (True, SPEC_TO_TRT[s.dtype], s.dims) for s in input_specs(config)}
    declared.update({s.name: (False, SPEC_TO_TRT[s.dtype], s.dims) for s in output_specs(config)})
    return declared


def test_trtllm_engine_io_int32_indices_bf16_hidden_states(trtllm_config, trtllm_folder, standard_graph, tiny_backends,
                                                           monkeypatch):
    """The TensorRT-LLM engine (int32 indices and position ids, bf16 hidden states and K/V) and
    rank0's LM head: every feed is cast to the declared dtype (ids keep their values), the
    hidden states are the engine's buffer, logits come back float32 from the bf16 head (within
    bf16 rounding of the fp32 head graph on the same rows) and the cache holds the engine's
    presents."""
    config = tiny_backends["qwen2"].config
    declared = trtllm_declared(trtllm_config)
    assert declared["input_ids"][1] == "INT32" and declared["causal_len"][1] == "INT32"
    assert declared["hidden_states"][1] == "BF16" and declared["present_key_0"][1] == "BF16"
    assert "logits" not in declared
    seen = {}
    run_onnx = onnx_runner(standard_graph[1])

    def run(feeds):
        seen.update(feeds)
        return run_onnx(feeds)

    ranges = builder_ranges(trtllm_config, 8, 1023, 1024 + 20, 4)
    engine = DeclaredEngine(declared, ranges, run)
    recording_bind(monkeypatch, engine)
    head = trtllm_head_weight(trtllm_folder / "rank0.safetensors", config)
    reference = tiny_backends["qwen2"].model
    assert torch.equal(head, reference.lm_head.weight.bfloat16())  # tied: the embedding, cut to the vocabulary
    backend = EngineBackend(engine, config, "trtllm", head, device="cpu")
    assert backend.dtype == torch.bfloat16
    cache = backend.new_cache(2, 64)
    cache.keys.normal_()
    cache.values.normal_()
    cache.commit([5, 9])
    layout = Layout.decode(4)
    ids = torch.randint(0, config.vocab_size, (2, layout.num_new))
    hidden = backend.hidden_states(ids, layout, cache)
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (2, layout.num_new, config.hidden_size)
    assert hidden.data_ptr() == engine.bound["hidden_states"].data_ptr()  # the engine's buffer, not a copy
    assert engine.bound["input_ids"].dtype == torch.int32 and np.array_equal(seen["input_ids"], ids.numpy())
    assert np.array_equal(seen["position_ids"], layout.position_ids(cache.lengths).numpy())
    assert {n: int(seen[n]) for n in layout.kernel_scalars()} == layout.kernel_scalars()
    assert torch.equal(cache.keys[0, :, :, :9 + layout.num_new], engine.bound["present_key_0"])
    expected = run_onnx({n: v for n, v in seen.items()})
    assert torch.equal(hidden, torch.from_numpy(expected["hidden_states"]).bfloat16())
    rows = torch.tensor([[0, 3, 7], [4, 11, 19]])
    logits = backend.head(gather_rows(hidden, rows))
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, config.vocab_size)
    path = standard_graph[0]
    fp32_head = OnnxRuntimeBackend(path, default_head_path(path), config, threads=1).head
    oracle = fp32_head(gather_rows(hidden, rows).float())
    scale = oracle.abs().max().item()
    assert (logits - oracle).abs().max().item() < 2e-2 * scale  # bf16 weight and output rounding only


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
        assert torch_dtype(_Enum("DataType", name)) == dtype
    assert torch_dtype("DataType.INT32") == torch.int32  # str() of a pybind11 enum value
    with pytest.raises(ValueError, match="FP8"):
        torch_dtype(_Enum("DataType", "FP8"))
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

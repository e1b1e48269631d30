"""Backends over serialized engines of the decode step: TensorRT and TensorRT-LLM (GPU hosts).

    EngineBackend.tensorrt(OUT)   OUT/tensorrt/decode_step.engine, built by `tidar-export build`
                                  from onnx/decode_step_plugin.onnx with the `tidar::hybrid_attention`
                                  plugin (tidar.plugins.tensorrt_plugin)
    EngineBackend.trtllm(OUT)     OUT/engine/rank0.engine, the TiDARForCausalLM engine of
                                  TensorRT-LLM 1.2.x (tensor-parallel size 1), whose attention is
                                  the TensorRT-LLM Python plugin (tidar.plugins.trtllm_plugin)

Both engines have the explicit-cache interface of the exported decode step: inputs `input_ids`,
(`position_ids` for TensorRT-LLM), `past_lens`, the five layout scalars and `past_key_i` /
`past_value_i`; outputs `hidden_states` (final-norm, [batch, new, hidden]) and `present_key_i` /
`present_value_i`. Each forward hands the first max(lengths) slots of the runtime's KVCache (on
the GPU) to the engine and copies `present` back, which writes the new tokens' K/V without
committing them, as the ONNX Runtime backend does.

The LM head is not in the engines: `head` multiplies the rows the decode loop picks from the
engine's `hidden_states` buffer by the head weight on the device (one GEMM, float32 logits), so
a step computes 2b - 1 rows of logits instead of b(b + 1) (docs/design.md §3.2, §3.8). The weight
is the one each engine was built from, in the engine's hidden-state dtype: for TensorRT-LLM,
lm_head.weight of trtllm/rank0.safetensors (the embedding's copy when tied) cut to the vocabulary;
for TensorRT, the weight of onnx/lm_head.onnx (the graph the ONNX Runtime backend runs).

The engine, not this module, decides every dtype and shape: the exporters declare different I/O
(the TensorRT-LLM engine takes int32 indices and writes hidden states and K/V of the model dtype,
the ONNX -> TensorRT engine takes int64 indices and writes those of the graph's dtype), and TensorRT's
`set_tensor_address` takes a bare pointer with no dtype check. So each feed is cast to
`engine.get_tensor_dtype(name)`, each output buffer is allocated with that dtype and the shape
`context.get_tensor_shape(name)` reports once the input shapes are set, and an input shape
outside the engine's optimization profile is refused with its name and shape. `bind` does all
of this and is tested on CPU against the I/O each exporter declares (tests/test_engine_io.py).

Addresses: TensorRT's `setTensorAddress` wants every address non-null and 256-byte aligned
(NvInferRuntime.h), and returns false otherwise; a view of the cache (an empty past at prefill, a
row of a cache whose row size is not a multiple of 256 bytes) may be neither, so `aligned` gives
such a tensor an aligned copy and every `set_tensor_address` result is checked.

The step on a GPU: the engine runs on a stream of its own (never the legacy default stream, on
which TensorRT adds a device synchronization), ordered after the work already queued on the
caller's stream and before what the caller queues next, with no host synchronization; the
layout scalars are device tensors made once per layout (no host-to-device copy per step, the
lengths and ids are already on the device); and only the slots the step can change are copied
back from `present` (from the shortest row's past on: slots before it are the past, unchanged).
The past itself is still copied into a dense input per layer (the explicit-cache interface takes
[batch, heads, past, head_dim] tensors; a cache slice of fewer slots than its capacity is not dense).

tensorrt / tensorrt_llm are imported only when a backend is opened; without them (or without
CUDA) opening raises EngineUnavailable with the reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tidar.runtime.cache import KVCache
from tidar.runtime.config import TiDARConfig
from tidar.runtime.layout import Layout
from .base import HEAD_GRAPH, TENSORRT_ENGINE, TRTLLM_ENGINE, TRTLLM_WEIGHTS, BackendBase, head_graph_weight

# tensorrt.DataType member names -> torch dtypes (the I/O dtypes either exporter can declare)
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


class EngineUnavailable(RuntimeError):
    """The engine cannot be opened here (a missing package, no GPU, no engine file); says why."""


def _require(module: str, why: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineUnavailable(f"{why} needs the `{module.split('.')[0]}` package ({exc})") from None


def _member_name(enum_value) -> str:
    """The member name of a TensorRT enum value (pybind11 enums have `.name`; str is 'Type.NAME')."""
    return getattr(enum_value, "name", None) or str(enum_value).rsplit(".", 1)[-1]


def torch_dtype(trt_dtype) -> torch.dtype:
    """The torch dtype of a tensorrt.DataType; raises ValueError for one the runtime cannot bind."""
    name = _member_name(trt_dtype)
    if name not in TORCH_DTYPES:
        raise ValueError(f"engine tensor dtype {name} has no torch equivalent here "
                         f"(supported: {', '.join(TORCH_DTYPES)})")
    return TORCH_DTYPES[name]


@dataclass(frozen=True)
class TensorIO:
    """One I/O tensor of an engine, as the engine declares it."""

    name: str
    is_input: bool
    dtype: torch.dtype


def engine_io(engine) -> dict[str, TensorIO]:
    """{name: TensorIO} of every I/O tensor of a deserialized engine (ICudaEngine), in its order."""
    found = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        found[name] = TensorIO(name, _member_name(engine.get_tensor_mode(name)) == "INPUT",
                               torch_dtype(engine.get_tensor_dtype(name)))
    return found


ADDRESS_ALIGNMENT = 256
"""Bytes every address bound to a TensorRT engine must be a multiple of (NvInferRuntime.h,
IExecutionContext::setTensorAddress)."""


def tensor_address(tensor: torch.Tensor) -> int:
    """The address a tensor's data starts at, also for a tensor of no elements (whose `data_ptr()`
    is 0, while TensorRT wants a non-null address for every input): its storage's address plus
    its offset."""
    if tensor.numel():
        return tensor.data_ptr()
    return tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()


def aligned(tensor: torch.Tensor, alignment: int = ADDRESS_ALIGNMENT) -> torch.Tensor:
    """`tensor` when it is dense, its address non-null and a multiple of `alignment`; otherwise a
    dense copy at an aligned address (a tensor of no elements gets an aligned address with one
    element's bytes behind it)."""
    pointer = tensor_address(tensor)
    if pointer and pointer % alignment == 0 and tensor.is_contiguous():
        return tensor
    size = max(tensor.numel(), 1) * tensor.element_size()
    raw = torch.empty(size + alignment, dtype=torch.uint8, device=tensor.device)
    start = (-raw.data_ptr()) % alignment
    copy = raw[start:start + size].view(tensor.dtype)[:tensor.numel()].view(tensor.shape)
    if tensor.numel():
        copy.copy_(tensor)
    return copy


def profile_batch_limit(engine) -> int | None:
    """The batch dimension's maximum in optimization profile 0 of `engine` (ICudaEngine
    `get_tensor_profile_shape(name, profile_index)` -> [min, opt, max] shapes) for `input_ids`;
    None for an engine object without the query (a stand-in)."""
    query = getattr(engine, "get_tensor_profile_shape", None)
    if query is None:
        return None
    return int(query("input_ids", 0)[2][0])


class EngineBackend(BackendBase):
    """The runtime's Backend protocol (`hidden_states`, `head`, `forward`, `new_cache`) over one
    deserialized engine and the LM-head weight."""

    def __init__(self, engine, config: TiDARConfig, name: str, head_weight: torch.Tensor,
                 device: torch.device | str = "cuda"):
        """`engine`: a deserialized ICudaEngine (or anything with its I/O queries and
        `create_execution_context`); `head_weight`: the LM head [vocab, hidden] the engine's
        hidden states are multiplied by (see the module docstring)."""
        self.name, self.config, self.device = name, config, torch.device(device)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.io = engine_io(engine)
        self.inputs = [n for n, t in self.io.items() if t.is_input]
        self.outputs = [n for n, t in self.io.items() if not t.is_input]
        missing = [n for n in ("input_ids", "past_lens", "past_key_0", "hidden_states", "present_key_0")
                   if n not in self.io]
        if missing:
            raise EngineUnavailable(f"the {name} engine has no tensor {', '.join(missing)}: not a tidar decode step "
                                    "(an engine built before the LM head left the engine has `logits` instead of "
                                    "`hidden_states`: build it again)")
        self.dtype = self.io["past_key_0"].dtype  # the KV cache's dtype
        if tuple(head_weight.shape) != (config.vocab_size, config.hidden_size):
            raise EngineUnavailable(f"the {name} backend's LM head weight has shape {tuple(head_weight.shape)}, "
                                    f"config.json implies {(config.vocab_size, config.hidden_size)}")
        self.head_weight = head_weight.to(self.device, self.io["hidden_states"].dtype)
        self.max_batch_size = profile_batch_limit(engine)
        """The most rows of a step the engine's optimization profile takes (None: not known)."""
        self._layout_scalars: dict[Layout, dict[str, torch.Tensor]] = {}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        """The stream the engine runs on (see the module docstring); None off the GPU (stand-ins)."""

    @classmethod
    def open(cls, engine_path: Path, config: TiDARConfig, name: str,
             head_weight: Callable[[], torch.Tensor], device: torch.device | str = "cuda") -> "EngineBackend":
        """Deserialize `engine_path` on the CUDA `device` ("cuda": the current one); `head_weight`
        reads the LM head. TensorRT deserializes, makes the execution context and allocates on
        the calling thread's current device, so all of it runs under `torch.cuda.device(device)`."""
        trt = _require("tensorrt", f"the {name} backend")
        if not torch.cuda.is_available():
            raise EngineUnavailable(f"the {name} backend runs on an NVIDIA GPU; torch sees no CUDA device")
        device = torch.device(device)
        if device.type != "cuda":
            raise EngineUnavailable(f"the {name} backend runs on a CUDA device, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if not engine_path.is_file():
            raise EngineUnavailable(f"{engine_path}: no engine; build it with `tidar-export build --engine require` "
                                    "on a GPU host")
        with torch.cuda.device(device):
            engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
            if engine is None:
                raise EngineUnavailable(f"{engine_path}: TensorRT cannot deserialize the engine (built for another "
                                        "TensorRT version or GPU?)")
            return cls(engine, config, name, head_weight(), device=device)

    @classmethod
    def tensorrt(cls, folder: str | Path, config: TiDARConfig | None = None,
               device: torch.device | str = "cuda") -> "EngineBackend":
        _require("tensorrt", "the tensorrt backend")
        _require("onnx", "the tensorrt backend (its LM head is the weight of onnx/lm_head.onnx)")
        _require("tidar.plugins.tensorrt_plugin", "the tensorrt backend").register()  # before deserializing
        folder = Path(folder)
        config = config or TiDARConfig.from_file(folder)
        return cls.open(folder / TENSORRT_ENGINE, config, "tensorrt",
                        lambda: onnx_head_weight(folder / HEAD_GRAPH, config), device)

    @classmethod
    def trtllm(cls, folder: str | Path, config: TiDARConfig | None = None,
               device: torch.device | str = "cuda") -> "EngineBackend":
        _require("tensorrt_llm", "the trtllm backend")  # registers TensorRT-LLM's plugins
        _require("tidar.plugins.trtllm_plugin", "the trtllm backend")  # the Python plugin must be importable
        folder = Path(folder)
        if (folder / "engine" / "rank1.engine").exists():
            raise EngineUnavailable(f"{folder / 'engine'}: a tensor-parallel engine; serving engines of "
                                    "tensor-parallel size > 1 is not supported (build with --tp 1 to serve)")
        config = config or TiDARConfig.from_file(folder)
        return cls.open(folder / TRTLLM_ENGINE, config, "trtllm",
                        lambda: trtllm_head_weight(folder / TRTLLM_WEIGHTS, config), device)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def feeds(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> dict[str, torch.Tensor]:
        """The engine's inputs for one forward, each in the dtype the engine declares."""
        past = cache.max_length()  # host-side copy of the lengths: no device sync
        lengths = cache.lengths.to(self.device, torch.long)
        values = {"input_ids": input_ids.to(self.device), "past_lens": lengths,
                  "position_ids": layout.position_ids(lengths), **self.layout_scalars(layout)}
        for layer in range(self.config.num_hidden_layers):
            values[f"past_key_{layer}"] = cache.keys[layer, :, :, :past]
            values[f"past_value_{layer}"] = cache.values[layer, :, :, :past]
        missing = [name for name in self.inputs if name not in values]
        if missing:
            raise EngineUnavailable(f"the {self.name} engine wants inputs the runtime does not have: "
                                    f"{', '.join(missing)}")
        return {name: values[name].to(self.device, self.io[name].dtype).contiguous() for name in self.inputs}

    def layout_scalars(self, layout: Layout) -> dict[str, torch.Tensor]:
        """The five layout scalars of `layout` as 0-d device tensors, made once per layout."""
        found = self._layout_scalars.get(layout)
        if found is None:
            found = self._layout_scalars[layout] = {
                name: torch.tensor(value, device=self.device) for name, value in layout.kernel_scalars().items()}
        return found

    def bind(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> dict[str, torch.Tensor]:
        """{name: tensor} of every engine I/O for one forward: the feeds with their shapes set on
        the execution context, then each output allocated with the engine's dtype and the shape
        the context derives from those inputs."""
        bound = self.feeds(input_ids, layout, cache)
        for name, tensor in bound.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{self.name} engine: input {name!r} of shape {tuple(tensor.shape)} is outside the "
                                 "engine's optimization profile (batch, new tokens or past length beyond what it "
                                 "was built for)")
        for name in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.name} engine: output {name!r} has unresolved shape {shape}")
            bound[name] = torch.empty(shape, dtype=self.io[name].dtype, device=self.device)
        return {name: aligned(tensor) for name, tensor in bound.items()}

    def hidden_states(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states [B, layout.num_new, hidden] in the engine's dtype (its output
        buffer); the new K/V are written into `cache`, uncommitted."""
        c = self.config
        batch, num_new = input_ids.shape
        past = cache.max_length()  # host-side copy of the lengths: no device sync
        bound = self.bind(input_ids, layout, cache)
        expected = {"hidden_states": (batch, num_new, c.hidden_size)}
        expected.update({f"present_{kind}_{layer}": (batch, c.num_key_value_heads, past + num_new, c.head_dim)
                         for layer in range(c.num_hidden_layers) for kind in ("key", "value")})
        for name, shape in expected.items():
            if tuple(bound[name].shape) != shape:
                raise RuntimeError(f"{self.name} engine: output {name!r} has shape {tuple(bound[name].shape)}, "
                                   f"expected {shape}")
        for name, tensor in bound.items():
            pointer = tensor_address(tensor)
            if not pointer or pointer % ADDRESS_ALIGNMENT:
                raise RuntimeError(f"{self.name} engine: tensor {name!r} at address {pointer:#x} is not a non-null "
                                   f"multiple of {ADDRESS_ALIGNMENT} bytes (TensorRT's setTensorAddress rule)")
            if not self.context.set_tensor_address(name, pointer):
                raise RuntimeError(f"{self.name} engine: TensorRT refused the address {pointer:#x} of tensor {name!r}")
        if self.stream is not None:
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # the feeds were written on the caller's stream
            for tensor in bound.values():
                tensor.record_stream(self.stream)  # not reused by the allocator before the engine is done
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
            caller.wait_stream(self.stream)  # what the caller queues next sees the outputs; no host sync
        else:  # only stand-in engines run off the GPU (tests)
            ok = self.context.execute_async_v3(0)
        if not ok:
            raise RuntimeError(f"{self.name} engine execution failed")
        first = min(cache.host_lengths, default=0)  # slots before the shortest row's past are unchanged
        for layer in range(c.num_hidden_layers):
            cache.keys[layer, :, :, first:past + num_new] = bound[f"present_key_{layer}"][:, :, first:]
            cache.values[layer, :, :, first:past + num_new] = bound[f"present_value_{layer}"][:, :, first:]
        return bound["hidden_states"]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., vocab] of hidden states [..., hidden]: the LM head GEMM in the
        engine's hidden-state dtype on the device (as the head inside an engine computed it), then
        float32."""
        return torch.nn.functional.linear(hidden.to(self.device, self.head_weight.dtype), self.head_weight).float()


def onnx_head_weight(path: Path, config: TiDARConfig) -> torch.Tensor:
    """The weight [vocab, hidden] of the LM-head graph `path` (what the tensorrt backend applies)."""
    if not path.is_file():
        raise EngineUnavailable(f"{path}: missing; the tensorrt backend applies this graph's LM head weight")
    return head_graph_weight(path, config)


def trtllm_head_weight(path: Path, config: TiDARConfig) -> torch.Tensor:
    """lm_head.weight of the TensorRT-LLM rank file `path` (tp = 1: the whole head, its vocabulary
    zero-padded) cut to the vocabulary: [vocab, hidden] as stored."""
    from safetensors import safe_open

    if not path.is_file():
        raise EngineUnavailable(f"{path}: missing; the trtllm backend applies its lm_head.weight")
    with safe_open(str(path), framework="pt") as handle:
        if "lm_head.weight" not in handle.keys():
            raise EngineUnavailable(f"{path}: has no tensor 'lm_head.weight'")
        return handle.get_slice("lm_head.weight")[:config.vocab_size]

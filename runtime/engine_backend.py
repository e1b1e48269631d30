"""Backends over serialized engines of the decode step: TensorRT and TensorRT-LLM (GPU hosts).

    EngineBackend.tensorrt(OUT)   OUT/tensorrt/decode_step.engine, built by `tidar-export build`
                                  from onnx/decode_step_plugin.onnx with the `tidar::hybrid_attention`
                                  plugin (tidar.plugins.tensorrt_plugin)
    EngineBackend.trtllm(OUT)     OUT/engine/rank0.engine, the TiDARForCausalLM engine of
                                  TensorRT-LLM 1.2.x (tensor-parallel size 1), whose attention is
                                  the TensorRT-LLM Python plugin (tidar.plugins.trtllm_plugin)

Both engines have the explicit-cache interface of the exported decode step: inputs `input_ids`,
(`position_ids` for TensorRT-LLM), `past_lens`, the five layout scalars and `past_key_i` /
`past_value_i`; outputs `logits` and `present_key_i` / `present_value_i`. Each forward hands the
first max(lengths) slots of the runtime's KVCache (on the GPU) to the engine and copies
`present` back, which writes the new tokens' K/V without committing them, as the ONNX Runtime
backend does. tensorrt / tensorrt_llm are imported only when a backend is opened; without them
(or without CUDA) opening raises EngineUnavailable with the reason.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .cache import KVCache
from .config import TiDARConfig
from .layout import Layout

TENSORRT_ENGINE = "tensorrt/decode_step.engine"
TRTLLM_ENGINE = "engine/rank0.engine"


class EngineUnavailable(RuntimeError):
    """The engine cannot be opened here (a missing package, no GPU, no engine file); says why."""


def _require(module: str, why: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineUnavailable(f"{why} needs the `{module.split('.')[0]}` package ({exc})") from None


class EngineBackend:
    """The runtime's Backend protocol (`forward`, `new_cache`) over one serialized engine."""

    def __init__(self, engine_path: Path, config: TiDARConfig, name: str):
        trt = _require("tensorrt", f"the {name} backend")
        if not torch.cuda.is_available():
            raise EngineUnavailable(f"the {name} backend runs on an NVIDIA GPU; torch sees no CUDA device")
        if not engine_path.is_file():
            raise EngineUnavailable(f"{engine_path}: no engine; build it with `tidar-export build --engine require` "
                                    "on a GPU host")
        self.name, self.config, self.device = name, config, torch.device("cuda")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineUnavailable(f"{engine_path}: TensorRT cannot deserialize the engine (built for another "
                                    "TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtype = _torch_dtype(self.engine.get_tensor_dtype("past_key_0"))

    @classmethod
    def tensorrt(cls, folder: str | Path, config: TiDARConfig | None = None) -> "EngineBackend":
        _require("tensorrt", "the tensorrt backend")
        _require("tidar.plugins.tensorrt_plugin", "the tensorrt backend").register()  # before deserializing
        folder = Path(folder)
        return cls(folder / TENSORRT_ENGINE, config or TiDARConfig.from_file(folder), "tensorrt")

    @classmethod
    def trtllm(cls, folder: str | Path, config: TiDARConfig | None = None) -> "EngineBackend":
        _require("tensorrt_llm", "the trtllm backend")  # registers TensorRT-LLM's plugins
        _require("tidar.plugins.trtllm_plugin", "the trtllm backend")  # the Python plugin must be importable
        folder = Path(folder)
        if (folder / "engine" / "rank1.engine").exists():
            raise EngineUnavailable(f"{folder / 'engine'}: a tensor-parallel engine; this backend runs tp = 1 "
                                    "(serve tp > 1 engines with one process per rank under MPI)")
        return cls(folder / TRTLLM_ENGINE, config or TiDARConfig.from_file(folder), "trtllm")

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def feeds(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> dict[str, torch.Tensor]:
        """The engine's inputs for one forward (plain torch; tested without an engine)."""
        past = int(cache.lengths.max())
        lengths = cache.lengths.to(self.device, torch.long)
        feeds = {"input_ids": input_ids.to(self.device, torch.long).contiguous(), "past_lens": lengths.contiguous(),
                 "position_ids": layout.position_ids(lengths).contiguous()}
        feeds.update({name: torch.tensor(value, dtype=torch.long, device=self.device)
                      for name, value in layout.kernel_scalars().items()})
        for layer in range(self.config.num_hidden_layers):
            feeds[f"past_key_{layer}"] = cache.keys[layer, :, :, :past].contiguous()
            feeds[f"past_value_{layer}"] = cache.values[layer, :, :, :past].contiguous()
        return {name: feeds[name] for name in self.inputs}

    def forward(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        """Logits [B, layout.num_new, vocab]; the new K/V are written into `cache`, uncommitted."""
        c = self.config
        batch, num_new = input_ids.shape
        past = int(cache.lengths.max())
        outputs = {"logits": torch.empty(batch, num_new, c.vocab_size, dtype=self.dtype, device=self.device)}
        kv_shape = (batch, c.num_key_value_heads, past + num_new, c.head_dim)
        for layer in range(c.num_hidden_layers):
            for kind in ("key", "value"):
                outputs[f"present_{kind}_{layer}"] = torch.empty(kv_shape, dtype=self.dtype, device=self.device)
        feeds = self.feeds(input_ids, layout, cache)
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name} engine execution failed")
        stream.synchronize()
        for layer in range(c.num_hidden_layers):
            cache.keys[layer, :, :, :past + num_new] = outputs[f"present_key_{layer}"]
            cache.values[layer, :, :, :past + num_new] = outputs[f"present_value_{layer}"]
        return outputs["logits"]


def _torch_dtype(trt_dtype) -> torch.dtype:
    name = str(trt_dtype).rsplit(".", 1)[-1].lower()
    return {"float": torch.float32, "half": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)

"""The hybrid-attention kernel as a TensorRT-LLM (1.2.x, TensorRT-engine flow) Python plugin.

`hybrid_attention_trtllm(query, key, value, past_lens, causal_len, num_blocks, block_len,
first_visible, visible_stride, *, num_heads, num_kv_heads, head_dim, scale)` takes the inputs of
the ONNX op `tidar::hybrid_attention` in its order (contract.py):
- on `tensorrt_llm.Tensor`s (network definition, e.g. TiDARForCausalLM in
  export/trtllm_model.py) it adds one `TiDARHybridAttention` plugin layer and returns its output;
- on `torch.Tensor`s it runs the kernel at once (the same launcher the plugin calls).

`TiDARHybridAttention` (namespace "tidar") subclasses `tensorrt_llm.python_plugin.PluginBase`,
so it is defined only where tensorrt_llm imports. TensorRT-LLM pickles the plugin's attributes
into the engine and re-creates it when the engine is deserialized: import this module before
loading such an engine. Its `forward` launches the Triton kernel on `self.current_stream`, from
Python (the engine cannot run under the C++ runtime; tensorrt_plugin.py's ahead-of-time plugin
can).

No `from __future__ import annotations`: `@trtllm_plugin` reads the return annotation of
`shape_dtype_inference` as a class to count the outputs.
"""

from typing import Sequence

import torch

from . import contract

PLUGIN_NAME = "TiDARHybridAttention"
PLUGIN_NAMESPACE = "tidar"
PLUGIN_VERSION = "1"

try:
    from tensorrt_llm.python_plugin import PluginBase, SymTensor, trtllm_plugin
except (ImportError, OSError, RuntimeError) as error:  # absent, or installed without its CUDA libraries
    PluginBase, _IMPORT_ERROR = None, error
else:
    _IMPORT_ERROR = None


def require() -> type:
    """The plugin class; a clear error where tensorrt_llm is not importable."""
    if PluginBase is None:
        raise RuntimeError(f"the {PLUGIN_NAME} plugin needs tensorrt_llm 1.2.x (the TensorRT-engine flow): "
                           f"import failed with {type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}")
    return TiDARHybridAttention


if PluginBase is not None:

    @trtllm_plugin(PLUGIN_NAME, plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)
    class TiDARHybridAttention(PluginBase):
        """Attention under TiDAR's hybrid mask (contract.py); attributes as the ONNX op's."""

        def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
            super().__init__()
            contract.check_attributes(num_heads, num_kv_heads, head_dim, scale)
            self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

        def shape_dtype_inference(self, inputs: Sequence[SymTensor]) -> SymTensor:
            # TensorRT asks for dtypes and shapes separately (the other field is None): the output
            # is query's in both.
            return SymTensor(inputs[0].dtype, inputs[0].shape)

        def forward(self, inputs, outputs):
            from .hybrid_attention import hybrid_attention, tensor_from_pointer

            def as_torch(wrapper):
                if isinstance(wrapper, torch.Tensor):
                    return wrapper
                return tensor_from_pointer(wrapper.data_ptr(), wrapper.shape, str(wrapper.dtype).removeprefix("torch."))

            tensors = [as_torch(t) for t in inputs]
            _check(tensors, self.num_heads, self.num_kv_heads, self.head_dim, self.scale)
            with torch.cuda.stream(torch.cuda.ExternalStream(self.current_stream)):
                hybrid_attention(*tensors, scale=self.scale, out=as_torch(outputs[0]))


def _check(tensors: Sequence[torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
    """The op's checks on torch inputs, attributes included."""
    contract.check_attributes(num_heads, num_kv_heads, head_dim, scale)
    contract.check_shapes({name: tuple(t.shape) for name, t in zip(contract.INPUTS, tensors)},
                          num_heads, num_kv_heads, head_dim)


def hybrid_attention_trtllm(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible,
                            visible_stride, *, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
    """`tidar::hybrid_attention` in a TensorRT-LLM network (tensorrt_llm.Tensor inputs: one plugin
    layer, returns its output Tensor) or eagerly (torch.Tensor inputs: returns the result)."""
    inputs = (query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride)
    if all(isinstance(t, torch.Tensor) for t in inputs):
        _check(inputs, num_heads, num_kv_heads, head_dim, scale)
        from .hybrid_attention import hybrid_attention

        return hybrid_attention(*inputs, scale=scale)
    return require()(num_heads, num_kv_heads, head_dim, scale)(*inputs)

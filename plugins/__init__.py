"""tidar.plugins — the hybrid-mask attention op `tidar::hybrid_attention` and its front ends.

contract.py          the op's inputs, attributes, shape/dtype rules and kernel launch (plain Python)
hybrid_attention.py  the Triton kernel and its torch launcher (CUDA, or CPU under TRITON_INTERPRET=1)
tensorrt_plugin.py   TensorRT plugin (tensorrt.plugin): ahead-of-time kernel baked into engines
trtllm_plugin.py     TensorRT-LLM 1.2.x Python plugin for the TensorRT-engine flow

The plugins import nothing from tidar.runtime (the layout reaches them as five scalars); triton,
tensorrt and tensorrt_llm are imported only where needed.
"""

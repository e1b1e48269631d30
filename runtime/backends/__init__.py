"""tidar.runtime.backends — the executors the decode loop drives, behind one typed protocol.

base.py            the `Backend` protocol, `StepLogits`, and the artifact paths every executor shares
loading.py         `load_backend(name, path)`: open a checkpoint or an export with an executor
torch_backend.py   PyTorch (eager, SDPA, FlexAttention, Triton kernel); cuda_graphs.py its CUDA graphs
onnx_backend.py    ONNX Runtime on the exported decode-step and LM-head graphs
engine_backend.py  TensorRT and TensorRT-LLM engines (GPU hosts)
"""

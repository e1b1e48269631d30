"""Open a checkpoint or a `tidar-export build` output with an executor named by the user.

    backend = load_backend("onnxruntime", "OUT", threads=2)

Each executor module is imported only when asked for, so a host without onnxruntime, TensorRT
or TensorRT-LLM runs the others.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tidar.runtime.config import TiDARConfig
from .base import BACKENDS, HEAD_GRAPH, STEP_GRAPH, Backend


def load_backend(name: str, path: str | Path, **options) -> Backend:
    """Open the checkpoint or export at `path` with the executor `name`."""
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend.load(path, **options)
    if name == "onnxruntime":
        return load_onnxruntime(path, **options)
    if name in ("tensorrt", "trtllm"):
        return load_engine(name, path, **options)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


def load_onnxruntime(path: str | Path, dtype: str | None = None, attention: str = "eager", threads: int = 0,
                     mask_token_id: int | None = None, block_size: int | None = None):
    """The ONNX Runtime backend of a `tidar-export build` output: OUT/onnx/decode_step.onnx
    (standard lowering) and OUT/onnx/lm_head.onnx with OUT/config.json. The graph fixes dtype and
    attention: `dtype` may only name the graph's own, `attention` only "eager" (the graph's
    dense-mask attention)."""
    from tidar.runtime.checkpoint import CheckpointError
    from .onnx_backend import OnnxRuntimeBackend

    folder = Path(path)
    graph = folder / STEP_GRAPH
    for relative in (STEP_GRAPH, HEAD_GRAPH):
        if not (folder / relative).is_file():
            raise CheckpointError(f"{folder}: no {relative}; the onnxruntime backend opens the output folder of "
                                  "`tidar-export build` (an export made before the LM head became its own graph "
                                  "lacks onnx/lm_head.onnx: build it again)")
    if attention != "eager":
        raise CheckpointError(f"{graph}: attention {attention!r} is a torch backend option; the graph has its "
                              "own (eager) attention")
    config = TiDARConfig.from_file(folder, mask_token_id=mask_token_id, block_size=block_size)
    backend = OnnxRuntimeBackend(graph, folder / HEAD_GRAPH, config, threads=threads)
    if dtype is not None and backend.dtype != getattr(torch, dtype, None):
        raise CheckpointError(f"{graph}: the graph computes in {str(backend.dtype).removeprefix('torch.')}, "
                              f"not {dtype}")
    return backend


def load_engine(name: str, path: str | Path, dtype: str | None = None, attention: str = "eager",
                mask_token_id: int | None = None, block_size: int | None = None, device: str = "cuda", **_unused):
    """The TensorRT ("tensorrt") or TensorRT-LLM ("trtllm") engine of a `tidar-export build`
    output (engine_backend.py) on the CUDA `device`; GPU hosts only. The engine fixes dtype and attention."""
    from tidar.runtime.checkpoint import CheckpointError
    from .engine_backend import EngineBackend, EngineUnavailable

    config = TiDARConfig.from_file(path, mask_token_id=mask_token_id, block_size=block_size)
    try:
        backend = getattr(EngineBackend, name)(path, config, device=device)
    except EngineUnavailable as exc:
        raise CheckpointError(str(exc)) from None
    if dtype is not None and backend.dtype != getattr(torch, dtype, None):
        raise CheckpointError(f"{path}: the {name} engine computes in {str(backend.dtype).removeprefix('torch.')}, "
                              f"not {dtype}")
    return backend

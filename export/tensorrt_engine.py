"""TensorRT engine of the plugin ONNX graph (onnx/decode_step_plugin.onnx).

    unavailable_reason()                      -> None, or why no engine can be built here
    optimization_profile(config, draft_len)   -> {input: (min, opt, max) shape}   (plain Python)
    build_tensorrt_engine(onnx_path, engine_path, config, draft_len) -> record for manifest.json

The runtime runs the engine with `tidar.runtime.backends.engine_backend.EngineBackend.tensorrt(OUT)`.

The graph has one `tidar::hybrid_attention` node per layer; TensorRT's ONNX parser maps it to the
plugin `hybrid_attention` of namespace `tidar`, which `tidar.plugins.tensorrt_plugin.register()`
registers with `tensorrt.plugin` (ahead-of-time Triton kernel, so the engine runs without Python).
The parser finds a plugin by the node's op type and its string attribute `plugin_namespace`, and
picks the ahead-of-time implementation when the node has the int attribute `aot = 1` (the rule of
plugins/tensorrt_plugin.py); the graph on disk carries only the op's own attributes (its
contract), so those two are added to an in-memory copy of the graph before parsing
(`annotate_plugin_nodes`). Weights stay in the
external-data file next to the graph.

One optimization profile covers every layout: batch, new tokens and past length range as in
`export/engine_shapes.py` (tuned for one row, one decode step of the draft length).

tensorrt and the plugin module are imported only here and only when used; without them the
build records the engine as skipped with `unavailable_reason()`.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from tidar.runtime.config import TiDARConfig

from .engine_shapes import ENGINE_MAX_BATCH_SIZE, dimension_ranges, input_shapes
from .onnx_export import PLUGIN_DOMAIN, PLUGIN_OP, input_names

PLUGIN_MODULE = "tidar.plugins.tensorrt_plugin"
WORKSPACE_BYTES = 4 << 30


class TensorRTEngineError(RuntimeError):
    """The engine could not be built or run; the message says which step and why."""


def unavailable_reason() -> str | None:
    """Why no TensorRT engine can be built here (None: it can)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not importable (TensorRT needs an NVIDIA GPU host)"
    try:
        if importlib.util.find_spec(PLUGIN_MODULE) is None:
            return f"{PLUGIN_MODULE} (the TensorRT plugin of tidar::hybrid_attention) is not part of this tidar"
    except ImportError as exc:
        return f"{PLUGIN_MODULE} cannot be found: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device: building a TensorRT engine needs a GPU"
    from tidar.plugins.contract import engine_triton_problem

    return engine_triton_problem()


def optimization_profile(config: TiDARConfig, draft_len: int, max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
                         draft_blocks: int | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{graph input: (min, opt, max) shape} of the one profile (see `engine_shapes.input_shapes`)."""
    shapes = input_shapes(config, draft_len, max_batch_size=max_batch_size, draft_blocks=draft_blocks)
    missing = set(input_names(config.num_hidden_layers)) ^ set(shapes)
    if missing:
        raise ValueError(f"profile and graph inputs disagree on {sorted(missing)}")
    return shapes


def network_flags(trt) -> int:
    """create_network's flags: a strongly typed network, so every layer computes in the dtype the
    graph gives it (TensorRT 10.12 deprecated the builder's precision flags for this), and the
    ahead-of-time implementation of Python plugins that have both (the nodes' aot=1 says so too)."""
    flags = trt.NetworkDefinitionCreationFlag
    return (1 << int(flags.STRONGLY_TYPED)) | (1 << int(flags.PREFER_AOT_PYTHON_PLUGINS))


def annotate_plugin_nodes(graph) -> int:
    """Add plugin_namespace and aot to every tidar::hybrid_attention node of the
    onnx ModelProto `graph` (in place); returns how many nodes there are."""
    import onnx

    nodes = [n for n in graph.graph.node if n.domain == PLUGIN_DOMAIN and n.op_type == PLUGIN_OP]
    for node in nodes:
        present = {attribute.name for attribute in node.attribute}
        for name, value in (("plugin_namespace", PLUGIN_DOMAIN), ("aot", 1)):
            if name not in present:
                node.attribute.append(onnx.helper.make_attribute(name, value))
    return len(nodes)


def build_tensorrt_engine(onnx_path: str | Path, engine_path: str | Path, config: TiDARConfig,
                          draft_len: int, max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
                          draft_blocks: int | None = None) -> dict:
    """Build the engine of the plugin graph `onnx_path` into `engine_path`; returns what the
    manifest records (profile, TensorRT version). Raises TensorRTEngineError naming the step."""
    import onnx
    import tensorrt as trt

    plugins = importlib.import_module(PLUGIN_MODULE)
    plugins.register()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    graph = onnx.load(onnx_path, load_external_data=False)  # the structure; the parser reads the weights
    if annotate_plugin_nodes(graph) != config.num_hidden_layers:
        raise TensorRTEngineError(f"{onnx_path}: expected one {PLUGIN_DOMAIN}::{PLUGIN_OP} node per layer")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTEngineError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    shapes = optimization_profile(config, draft_len, max_batch_size, draft_blocks)
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise TensorRTEngineError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_record(config, draft_len, max_batch_size, draft_blocks, trt.__version__, onnx_path.name,
                         plugins.compiled_kernels())


def engine_record(config: TiDARConfig, draft_len: int, max_batch_size: int, draft_blocks: int | None,
                  tensorrt_version: str, source: str, kernels: list[dict]) -> dict:
    """What manifest.json records of a TensorRT engine build: versions, the draft shape, the rows
    it takes (`max_batch_size`, what `build.render_triton` serves at most), the profile's ranges
    and the kernels (PTX ISA version, tiles, Triton version of each)."""
    ranges = dimension_ranges(config, draft_len, max_batch_size, draft_blocks)
    return {"tensorrt": tensorrt_version, "source": source, "draft_len": draft_len, "draft_blocks": draft_blocks,
            "max_batch_size": max_batch_size,
            "profile": {dim: list(value.as_tuple()) for dim, value in ranges.items()},
            "kernels": kernels}

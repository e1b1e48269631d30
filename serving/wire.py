"""The wire contracts of the served models: tensor names, types and shapes, in plain Python and numpy.

One definition, read by every side of the wire (no torch and no Triton import here):
- the Triton models (serving/requests.py and serving/llmapi.py parse requests and build
  responses against it; serving/repository.py renders the `input`/`output` blocks of every
  config.pbtxt from it);
- the clients (client.py, openai_front.py build their requests with `request_arrays`).

Two contracts:
1. `INPUTS` / `OUTPUTS`, model `tidar` (and `ensemble`), described below.
2. `LLMAPI_INPUTS` / `LLMAPI_OUTPUTS`, model `tensorrt_llm`: TensorRT-LLM's LLM-API Triton model
   (triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt), the contract NVIDIA ships since
   the C++ backend's removal; `max_batch_size` 0, so its dims are whole shapes (no batch
   dimension). Its meaning here is serving/llmapi.py.

Names, types and shapes are those of NVIDIA tensorrtllm_backend's `ensemble` and
`tensorrt_llm_bls` models (all_models/inflight_batcher_llm), so its clients work unchanged: the
model is configured with `max_batch_size: MAX_BATCH_SIZE` = 1, so every tensor carries a leading
batch dimension of 1 ([1, 1] for a scalar). `text_output` is sent as shape [1] (one string per
request), as the backend's postprocessing model does and its clients read it. TiDAR's own inputs
(`draft_len`, `mode`, `timeout`; `input_ids`, the prompt as token ids, which the model then takes
as they are, `text_input` being only its text) and outputs (`output_ids`, `finish_reason`,
`num_*`) come on top.
Left out: tensorrt_llm_bls's `num_draft_tokens` input (the draft length of a separate draft model;
TiDAR drafts itself, see `draft_len`), whose name is TiDAR's per-response draft-token counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

MAX_BATCH_SIZE = 1
"""Triton `max_batch_size` of the model: one prompt per request (the model batches requests itself)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    """Triton config type (TYPE_STRING, TYPE_INT32, ...)."""
    dims: tuple[int, ...]
    """Dims after the batch dimension (the whole shape in a model of max_batch_size 0)."""
    optional: bool = False

    @property
    def wire_type(self) -> str:
        """The type name of the inference protocol (BYTES, INT32, ...)."""
        return "BYTES" if self.data_type == "TYPE_STRING" else self.data_type[len("TYPE_"):]

    @property
    def numpy_dtype(self):
        return NUMPY_TYPES[self.data_type]


NUMPY_TYPES = {"TYPE_STRING": np.object_, "TYPE_BOOL": np.bool_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
               "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_UINT8": np.uint8}


def _inputs(*rows):
    return tuple(TensorSpec(name, kind, dims, optional=name not in ("text_input", "max_tokens"))
                 for name, kind, dims in rows)


_SCALAR = (1,)
INPUTS = _inputs(
    # tensorrtllm_backend ensemble / tensorrt_llm_bls, in their order
    ("text_input", "TYPE_STRING", _SCALAR), ("decoder_text_input", "TYPE_STRING", _SCALAR),
    ("image_input", "TYPE_FP16", (-1, 3, -1, -1)), ("image_bytes_input", "TYPE_UINT8", (-1, -1, -1, -1)),
    ("image_url_input", "TYPE_STRING", _SCALAR), ("video_bytes_input", "TYPE_UINT8", (-1, -1, -1, -1)),
    ("max_tokens", "TYPE_INT32", _SCALAR), ("bad_words", "TYPE_STRING", (-1,)), ("stop_words", "TYPE_STRING", (-1,)),
    ("exclude_input_in_output", "TYPE_BOOL", _SCALAR), ("end_id", "TYPE_INT32", _SCALAR),
    ("pad_id", "TYPE_INT32", _SCALAR), ("top_k", "TYPE_INT32", _SCALAR), ("top_p", "TYPE_FP32", _SCALAR),
    ("temperature", "TYPE_FP32", _SCALAR), ("length_penalty", "TYPE_FP32", _SCALAR),
    ("repetition_penalty", "TYPE_FP32", _SCALAR), ("min_tokens", "TYPE_INT32", _SCALAR),
    ("presence_penalty", "TYPE_FP32", _SCALAR), ("frequency_penalty", "TYPE_FP32", _SCALAR),
    ("seed", "TYPE_UINT64", _SCALAR), ("return_log_probs", "TYPE_BOOL", _SCALAR),
    ("return_context_logits", "TYPE_BOOL", _SCALAR), ("return_generation_logits", "TYPE_BOOL", _SCALAR),
    ("num_return_sequences", "TYPE_INT32", _SCALAR), ("beam_width", "TYPE_INT32", _SCALAR),
    ("stream", "TYPE_BOOL", _SCALAR), ("prompt_embedding_table", "TYPE_FP16", (-1, -1)),
    ("prompt_vocab_size", "TYPE_INT32", _SCALAR), ("prompt_table_extra_id", "TYPE_UINT64", _SCALAR),
    ("embedding_bias_words", "TYPE_STRING", (-1,)), ("embedding_bias_weights", "TYPE_FP32", (-1,)),
    ("use_draft_logits", "TYPE_BOOL", _SCALAR),
    ("lora_task_id", "TYPE_UINT64", _SCALAR), ("lora_weights", "TYPE_FP16", (-1, -1)),
    ("lora_config", "TYPE_INT32", (-1, 3)), ("return_perf_metrics", "TYPE_BOOL", _SCALAR),
    ("guided_decoding_guide_type", "TYPE_STRING", _SCALAR), ("guided_decoding_guide", "TYPE_STRING", _SCALAR),
    # the older tensorrt_llm model's spelling of `seed`
    ("random_seed", "TYPE_UINT64", _SCALAR),
    # TiDAR's own
    ("draft_len", "TYPE_INT32", _SCALAR), ("mode", "TYPE_STRING", _SCALAR), ("timeout", "TYPE_FP32", _SCALAR),
    ("input_ids", "TYPE_INT32", (-1,)),
)
OUTPUTS = tuple(TensorSpec(name, kind, dims) for name, kind, dims in (
    ("text_output", "TYPE_STRING", (-1,)), ("cum_log_probs", "TYPE_FP32", (-1,)),
    ("output_log_probs", "TYPE_FP32", (-1, -1)), ("batch_index", "TYPE_INT32", _SCALAR),
    ("sequence_index", "TYPE_INT32", _SCALAR), ("kv_cache_alloc_new_blocks", "TYPE_INT32", _SCALAR),
    ("kv_cache_reused_blocks", "TYPE_INT32", _SCALAR), ("kv_cache_alloc_total_blocks", "TYPE_INT32", _SCALAR),
    ("arrival_time_ns", "TYPE_INT64", _SCALAR), ("first_scheduled_time_ns", "TYPE_INT64", _SCALAR),
    ("first_token_time_ns", "TYPE_INT64", _SCALAR), ("last_token_time_ns", "TYPE_INT64", _SCALAR),
    ("acceptance_rate", "TYPE_FP32", _SCALAR), ("total_accepted_draft_tokens", "TYPE_INT32", _SCALAR),
    ("total_draft_tokens", "TYPE_INT32", _SCALAR),
    # TiDAR's own
    ("output_ids", "TYPE_INT32", (-1,)), ("finish_reason", "TYPE_STRING", _SCALAR),
    ("num_forward_passes", "TYPE_INT32", _SCALAR), ("num_draft_tokens", "TYPE_INT32", _SCALAR),
    ("num_accepted_draft_tokens", "TYPE_INT32", _SCALAR),
    ("stop_reason", "TYPE_STRING", _SCALAR),
))
INPUT_SPECS = {spec.name: spec for spec in INPUTS}
OUTPUT_SPECS = {spec.name: spec for spec in OUTPUTS}
PERF_METRIC_OUTPUTS = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
                       "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
                       "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens")
"""Sent on every response of a request with `return_perf_metrics` (as the backend does)."""
MODES = ("tidar", "ar")

LLMAPI_MODEL = "tensorrt_llm"
"""Name of the LLM-API model (TensorRT-LLM's template names it so; its clients call it by it)."""
LLMAPI_INPUTS = tuple(TensorSpec(name, kind, dims, optional=name != "text_input") for name, kind, dims in (
    # TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt, in its order
    ("text_input", "TYPE_STRING", (-1,)), ("image_url", "TYPE_STRING", (-1,)), ("streaming", "TYPE_BOOL", (1,)),
    ("sampling_param_best_of", "TYPE_INT32", (1,)), ("sampling_param_temperature", "TYPE_FP32", (1,)),
    ("sampling_param_top_k", "TYPE_INT32", (1,)), ("sampling_param_top_p", "TYPE_FP32", (1,)),
    ("sampling_param_frequency_penalty", "TYPE_FP32", (1,)), ("sampling_param_presence_penalty", "TYPE_FP32", (1,)),
    ("sampling_param_max_tokens", "TYPE_INT32", (1,)), ("sampling_param_stop", "TYPE_STRING", (-1,)),
    ("sampling_param_seed", "TYPE_UINT64", (1,)), ("sampling_param_exclude_input_from_output", "TYPE_BOOL", (1,)),
    ("sampling_param_return_perf_metrics", "TYPE_BOOL", (1,)), ("return_finish_reason", "TYPE_BOOL", (1,)),
    ("return_stop_reason", "TYPE_BOOL", (1,)), ("return_cumulative_logprob", "TYPE_BOOL", (1,)),
    ("stop", "TYPE_BOOL", (1,)), ("lora_id", "TYPE_UINT64", (1,)), ("lora_name", "TYPE_STRING", (1,)),
    ("lora_path", "TYPE_STRING", (1,)), ("lora_ckpt_source", "TYPE_STRING", (1,)),
))
LLMAPI_OUTPUTS = tuple(TensorSpec(name, kind, dims) for name, kind, dims in (
    ("text_output", "TYPE_STRING", (-1,)), ("finish_reason", "TYPE_STRING", (-1,)),
    ("stop_reason", "TYPE_STRING", (-1,)), ("cumulative_logprob", "TYPE_FP32", (-1,)),
    ("kv_cache_reused_block", "TYPE_INT32", (-1,)), ("kv_cache_missed_block", "TYPE_INT32", (-1,)),
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", (-1,)), ("kv_cache_alloc_total_blocks", "TYPE_INT32", (-1,)),
    ("kv_cache_hit_rate", "TYPE_FP32", (-1,)), ("arrival_time_ns", "TYPE_INT64", (1,)),
    ("first_scheduled_time_ns", "TYPE_INT64", (1,)), ("first_token_time_ns", "TYPE_INT64", (1,)),
    ("last_token_time_ns", "TYPE_INT64", (1,)), ("acceptance_rate", "TYPE_FP32", (1,)),
    ("total_accepted_draft_tokens", "TYPE_INT32", (1,)), ("total_draft_tokens", "TYPE_INT32", (1,)),
))
LLMAPI_INPUT_SPECS = {spec.name: spec for spec in LLMAPI_INPUTS}
LLMAPI_OUTPUT_SPECS = {spec.name: spec for spec in LLMAPI_OUTPUTS}
LLMAPI_FORWARDED = {
    "sampling_param_temperature": "temperature", "sampling_param_top_k": "top_k", "sampling_param_top_p": "top_p",
    "sampling_param_frequency_penalty": "frequency_penalty", "sampling_param_presence_penalty": "presence_penalty",
    "sampling_param_seed": "seed", "sampling_param_stop": "stop_words", "sampling_param_max_tokens": "max_tokens",
}
"""LLM-API inputs that are `tidar` inputs of the same meaning, by their `tidar` name."""
LLMAPI_DEFAULT_MAX_TOKENS = 32
"""`sampling_param_max_tokens` when absent: the LLM API's SamplingParams.max_tokens default."""
PERF_METRIC_LLMAPI_OUTPUTS = tuple(spec.name for spec in LLMAPI_OUTPUTS[4:])
"""Sent when `sampling_param_return_perf_metrics` is set."""


def sampling_choice(temperature: float | None, top_k: int | None, top_p: float | None) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) for the runtime's SamplingParams, with TensorRT-LLM's meaning of
    the three inputs and of their absence: temperature defaults to 1.0, top_k and top_p to 0
    (DefaultDecodingParams); a top_p <= 0 counts as unset (tensorrt_llm model.py); top_k = 0 with
    top_p = 0 is greedy and top_k > 0 with top_p = 0 samples the top k (regularizeTopKTopP), so a
    request that sends only `temperature` is decoded greedily there, and here. temperature = 0 also
    means greedy. Greedy is returned as temperature 0 (the runtime's spelling)."""
    temperature = 1.0 if temperature is None else float(temperature)
    top_k = 0 if top_k is None else int(top_k)
    top_p = 0.0 if top_p is None or top_p <= 0 else float(top_p)
    if temperature == 0 or top_k == 1 or (top_k == 0 and top_p == 0):
        return 0.0, 0, 1.0
    return temperature, top_k, (top_p or 1.0)


def request_arrays(text: str, max_tokens: int, **values) -> dict[str, np.ndarray]:
    """The input tensors of one request, batch dimension included: `values` are optional inputs by
    name (None = left out); a list is sent for the list inputs (stop_words, bad_words)."""
    arrays = {}
    for name, value in {"text_input": text, "max_tokens": max_tokens, **values}.items():
        if value is None:
            continue
        spec = INPUT_SPECS.get(name)
        if spec is None:
            raise ValueError(f"unknown input {name!r}; the contract's inputs: {', '.join(INPUT_SPECS)}")
        items = value if isinstance(value, (list, tuple)) else [value]
        if spec.data_type == "TYPE_STRING":
            items = [item.encode("utf-8") if isinstance(item, str) else item for item in items]
        arrays[name] = np.array([items], dtype=spec.numpy_dtype)
    return arrays


def text_value(value, name: str, error: Callable[[str], Exception]) -> str:
    """The UTF-8 text of a BYTES input element `value` of input `name`; `error(message)` is raised
    (naming the input) for anything else."""
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"input '{name}' is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise error(f"input '{name}' must be a UTF-8 string, got {type(value).__name__}")


def request_inputs(request, specs, get_input_tensor_by_name) -> dict[str, np.ndarray]:
    """The inputs of `specs` that a Triton request carries, as numpy arrays (name -> array);
    `get_input_tensor_by_name` is triton_python_backend_utils' (only the model process has it)."""
    inputs = {}
    for spec in specs:
        tensor = get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            inputs[spec.name] = tensor.as_numpy()
    return inputs

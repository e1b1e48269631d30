"""The meaning of the `tensorrt_llm` model's contract: TensorRT-LLM's LLM-API Triton model, served
by the `tidar` model's scheduler (no Triton and no torch import here; numpy only).

The contract's names, types and shapes are wire.LLMAPI_INPUTS / LLMAPI_OUTPUTS. The Triton model
(serving/llmapi_model.py) turns each request into one request to the `tidar` model of the same
server (a BLS call: one scheduler, one copy of the weights, docs/design.md §6.2) with
`parse_llmapi_request`, and turns the `tidar` model's responses into this contract's with
`LlmapiReply`. Semantics follow TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1/
model.py and helpers.py, which hand the inputs to the LLM API's SamplingParams:

- `text_input`: one prompt (the model reads element 0; more than one is refused here).
- `sampling_param_*`: as SamplingParams reads them. Greedy unless `top_k` > 1 or `top_p` > 0
  (SamplingParams._greedy_decoding; `tidar`'s `wire.sampling_choice` is the same rule), so a
  request that sends only a temperature is greedy, unless the checkpoint's generation_config.json
  gives defaults: those fill the temperature, top_k and top_p a request leaves unset (applied by
  the `tidar` model, which gets only the inputs sent; a temperature of 0 stays greedy);
  `max_tokens` defaults to 32 (SamplingParams);
  `stop` strings end the output before them (include_stop_str_in_output false);
  `best_of` must be 1 (more needs beam search or n-best selection: refused).
- `sampling_param_exclude_input_from_output` (default false, helpers.py): a non-streaming
  `text_output` starts with the prompt unless it is set.
- `streaming`: one response per decode step; as in model.py, each streamed `text_output` is the
  LLM API's `output.text`, the text generated so far (cumulative, without the prompt), not the
  step's new text.
- `return_finish_reason`, `return_stop_reason`, `return_cumulative_logprob`: add those outputs,
  as model.py does with `str(...)` of the LLM API's values: finish reason "stop" | "length" |
  "timeout" | "cancelled", "None" while unfinished; stop reason the stop string that ended the
  output, else "None" (an end id, as the LLM API reports it). `cumulative_logprob` is the sum of
  the output tokens' log probabilities (the `tidar` model's `cum_log_probs`), sent as the
  declared FP32 (model.py sends every output as a string; its config.pbtxt declares FP32).
- `sampling_param_return_perf_metrics`: the timing, draft and KV-cache outputs (below).
- Refused with INVALID_ARG naming the input: `image_url` (multimodal), `lora_*` (LoRA),
  `best_of` > 1, `stop` = true (cancel by request id: cancel the request itself instead).

The KV-cache outputs, for this cache (runtime/cache.py: fixed per-row slots, no paging, no
prefix reuse): a "block" is one token slot. `kv_cache_alloc_new_blocks` =
`kv_cache_alloc_total_blocks` = the slots the request's row holds (prompt + output so far),
`kv_cache_reused_block` = 0 and `kv_cache_hit_rate` = 0 (nothing is reused),
`kv_cache_missed_block` = the slots computed, i.e. all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .wire import text_value
from .wire import (INPUT_SPECS, LLMAPI_DEFAULT_MAX_TOKENS, LLMAPI_FORWARDED, LLMAPI_INPUT_SPECS,
                   LLMAPI_OUTPUT_SPECS, PERF_METRIC_LLMAPI_OUTPUTS)


class LlmapiRequestError(ValueError):
    """A request the `tensorrt_llm` model refuses; the message names the input and the value."""


REFUSED = {
    "image_url": "multimodal inputs are not supported",
    "lora_id": "LoRA is not supported", "lora_name": "LoRA is not supported",
    "lora_path": "LoRA is not supported", "lora_ckpt_source": "LoRA is not supported",
}
TIDAR_OUTPUTS = ("text_output", "output_ids", "finish_reason", "stop_reason", "cum_log_probs",
                 "kv_cache_alloc_new_blocks", "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns",
                 "last_token_time_ns", "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens")
"""The `tidar` outputs the `tensorrt_llm` model asks for."""


@dataclass
class LlmapiRequest:
    tidar_inputs: dict[str, np.ndarray]
    """The request to the `tidar` model (its names, batch dimension included): always streaming,
    without the prompt, so that every decode step comes back."""
    prompt: str
    streaming: bool = False
    exclude_input: bool = False
    perf_metrics: bool = False
    finish_reason: bool = False
    stop_reason: bool = False
    cumulative_logprob: bool = False


def _value(inputs: dict, name: str):
    """The single value of input `name` (None if absent); refuses another element count by name."""
    array = inputs.get(name)
    if array is None:
        return None
    array = np.asarray(array)
    if array.size != 1:
        raise LlmapiRequestError(f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.item() if hasattr(value, "item") else value


def _text(value, name: str) -> str:
    return text_value(value, name, LlmapiRequestError)


def _given(inputs: dict, name: str) -> bool:
    """Whether input `name` carries anything (an empty list or empty strings count as not given)."""
    array = inputs.get(name)
    if array is None:
        return False
    array = np.asarray(array)
    if array.dtype == np.object_:
        return any(bytes(v) if isinstance(v, (bytes, np.bytes_)) else str(v) for v in array.reshape(-1))
    return array.size > 0


def parse_llmapi_request(inputs: dict[str, np.ndarray], parameters: dict | None = None) -> LlmapiRequest:
    """The `tidar` request of one `tensorrt_llm` request's input tensors (name -> array, shapes as
    the contract's, no batch dimension); LlmapiRequestError names what is refused. `parameters`
    are the request's other parameters: Triton's generate endpoint makes every JSON field that
    names no input one, so a misspelt or old input name (`max_tokens`) would otherwise be ignored
    without a word; any is refused by name."""
    unknown = sorted(set(inputs) - set(LLMAPI_INPUT_SPECS))
    if unknown:
        raise LlmapiRequestError(f"unknown input(s) {unknown}")
    for name in sorted(parameters or {}):
        hint = f" (did you mean 'sampling_param_{name}'?)" if f"sampling_param_{name}" in LLMAPI_INPUT_SPECS else ""
        raise LlmapiRequestError(f"'{name}' is not an input of this model{hint}; its inputs: "
                                 f"{', '.join(LLMAPI_INPUT_SPECS)}")
    text = inputs.get("text_input")
    if text is None:
        raise LlmapiRequestError("input 'text_input' is missing")
    prompt = _text(_value(inputs, "text_input"), "text_input")
    for name, reason in REFUSED.items():
        if _given(inputs, name):
            raise LlmapiRequestError(f"input '{name}' is not supported: {reason}")
    if _value(inputs, "stop"):
        raise LlmapiRequestError("input 'stop' = True is not supported: cancelling another request by its id is "
                                 "not implemented; cancel that request itself (close its gRPC stream)")
    best_of = _value(inputs, "sampling_param_best_of")
    if best_of is not None and best_of != 1:
        raise LlmapiRequestError(f"input 'sampling_param_best_of' = {best_of} is not supported: only 1 (no beam "
                                 "search or n-best selection)")
    max_tokens = _value(inputs, "sampling_param_max_tokens")
    forwarded = {"text_input": prompt, "stream": True, "exclude_input_in_output": True,
                 "max_tokens": LLMAPI_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens}
    for name, tidar_name in LLMAPI_FORWARDED.items():
        if name in inputs and name != "sampling_param_max_tokens":
            forwarded[tidar_name] = np.asarray(inputs[name]).reshape(-1).tolist() if name == "sampling_param_stop" \
                else _value(inputs, name)
    flag = lambda name: bool(_value(inputs, name))  # noqa: E731
    request = LlmapiRequest({}, prompt, streaming=flag("streaming"),
                            exclude_input=flag("sampling_param_exclude_input_from_output"),
                            perf_metrics=flag("sampling_param_return_perf_metrics"),
                            finish_reason=flag("return_finish_reason"), stop_reason=flag("return_stop_reason"),
                            cumulative_logprob=flag("return_cumulative_logprob"))
    forwarded["return_perf_metrics"] = request.perf_metrics or None
    forwarded["return_log_probs"] = request.cumulative_logprob or None
    for name, value in forwarded.items():
        if value is None:
            continue
        spec = INPUT_SPECS[name]
        items = value if isinstance(value, list) else [value]
        if spec.data_type == "TYPE_STRING":
            items = [item.encode("utf-8") if isinstance(item, str) else item for item in items]
        request.tidar_inputs[name] = np.array([items], dtype=spec.numpy_dtype)
    return request


_TIDAR_TO_LLMAPI = {tidar: name for name, tidar in LLMAPI_FORWARDED.items()}


def llmapi_message(message: str) -> str:
    """A `tidar` error message with the inputs it names renamed to this contract's names."""
    def rename(match):
        name = match.group(2)
        return match.group(1) + _TIDAR_TO_LLMAPI.get(name, name)
    return re.sub(r"(\binputs? '?)(\w+)", rename, message)


def _one(name: str, value) -> np.ndarray:
    return np.array([value], dtype=LLMAPI_OUTPUT_SPECS[name].numpy_dtype)


class LlmapiReply:
    """Turns the `tidar` responses of one request (each a dict of output arrays) into this
    contract's responses: `add` returns the output arrays to send now, or None."""

    def __init__(self, request: LlmapiRequest):
        self.request = request
        self.text = ""
        self.tokens = 0

    def add(self, outputs: dict[str, np.ndarray], final: bool) -> dict[str, np.ndarray] | None:
        piece = outputs.get("text_output")
        if piece is not None:
            self.text += bytes(np.asarray(piece).reshape(-1)[0]).decode("utf-8")
        ids = outputs.get("output_ids")
        self.tokens += 0 if ids is None else int(np.asarray(ids).size)
        if not final and not self.request.streaming:
            return None
        text = self.text if self.request.streaming or self.request.exclude_input else self.request.prompt + self.text
        tensors = {"text_output": _one("text_output", text.encode("utf-8"))}
        reason = _string(outputs.get("finish_reason")) if final else ""
        if self.request.finish_reason:
            tensors["finish_reason"] = _one("finish_reason", (reason or "None").encode())
        if self.request.stop_reason:
            stop = _string(outputs.get("stop_reason")) if reason == "stop" else ""
            tensors["stop_reason"] = _one("stop_reason", (stop or "None").encode())
        if self.request.cumulative_logprob:
            cumulative = outputs.get("cum_log_probs")
            tensors["cumulative_logprob"] = _one("cumulative_logprob", 0.0 if cumulative is None else
                                                 float(np.asarray(cumulative).reshape(-1)[0]))
        if self.request.perf_metrics:
            tensors.update(self._perf_metrics(outputs))
        return tensors

    def _perf_metrics(self, outputs) -> dict[str, np.ndarray]:
        def scalar(name, default=0):
            value = outputs.get(name)
            return default if value is None else np.asarray(value).reshape(-1)[0].item()

        slots = scalar("kv_cache_alloc_new_blocks")
        values = {"kv_cache_reused_block": 0, "kv_cache_missed_block": slots, "kv_cache_alloc_new_blocks": slots,
                  "kv_cache_alloc_total_blocks": slots, "kv_cache_hit_rate": 0.0}
        for name in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
                     "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens"):
            values[name] = scalar(name)
        return {name: _one(name, values[name]) for name in PERF_METRIC_LLMAPI_OUTPUTS}


def _string(array) -> str:
    if array is None:
        return ""
    value = np.asarray(array).reshape(-1)[0]
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)

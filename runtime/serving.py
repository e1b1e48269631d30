"""The `tidar` Triton model's request and response tensors, as plain Python (no Triton import).

Names follow NVIDIA's tensorrtllm_backend (DESIGN.md, "Triton model `tidar`"). `parse_request`
turns the input tensors of one request (name -> numpy array) into a runtime `Request` plus the
serving options, or raises RequestError naming the input and the value; `response_tensors`
turns what a response reports into output tensors. The model (triton_repo/tidar/1/model.py)
only moves these between Triton and the scheduler, and its config.pbtxt declares exactly
`INPUTS` and `OUTPUTS` (a test checks the template against them).

Beyond the contract: an optional `timeout` input (FP32 seconds; the request ends with finish
reason "timeout" and the output so far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import TiDARConfig
from .generate import Delta, Request, RequestError
from .sampling import SamplingError, SamplingParams
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config type
    dims: tuple[int, ...]
    optional: bool = False


INPUTS = (
    TensorSpec("text_input", "TYPE_STRING", (1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("stream", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("top_p", "TYPE_FP32", (1,), optional=True),
    TensorSpec("top_k", "TYPE_INT32", (1,), optional=True),
    TensorSpec("random_seed", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("end_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("draft_len", "TYPE_INT32", (1,), optional=True),
    TensorSpec("mode", "TYPE_STRING", (1,), optional=True),
    TensorSpec("timeout", "TYPE_FP32", (1,), optional=True),
)
OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (1,)),
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (1,)),
    TensorSpec("num_forward_passes", "TYPE_INT32", (1,)),
    TensorSpec("num_draft_tokens", "TYPE_INT32", (1,)),
    TensorSpec("num_accepted_draft_tokens", "TYPE_INT32", (1,)),
)
MODES = ("tidar", "ar")


@dataclass
class ServingRequest:
    request: Request
    stream: bool
    draft_len: int | None
    """None: the server's adaptive draft length."""
    timeout: float | None


def _scalar(inputs: dict[str, np.ndarray], name: str):
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"input '{name}' must be a UTF-8 string, got {type(value).__name__}")


def parse_request(inputs: dict[str, np.ndarray], tokenizer: Tokenizer, config: TiDARConfig,
                  max_tokens_limit: int) -> ServingRequest:
    """The runtime request of one Triton request's inputs; RequestError names what is wrong."""
    unknown = set(inputs) - {spec.name for spec in INPUTS}
    if unknown:
        raise RequestError(f"unknown input(s) {sorted(unknown)}")
    if "text_input" not in inputs:
        raise RequestError("input 'text_input' is missing")
    text = _text(_scalar(inputs, "text_input"), "text_input")
    if not text:
        raise RequestError("input 'text_input' is empty: at least one token is needed")
    max_tokens = _scalar(inputs, "max_tokens")
    if max_tokens is None:
        raise RequestError("input 'max_tokens' is missing")
    max_tokens = int(max_tokens)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"input 'max_tokens' must be in [1, {max_tokens_limit}], got {max_tokens}")

    def number(name, default, kind=float):
        value = _scalar(inputs, name)
        return default if value is None else kind(value)

    temperature, top_p = number("temperature", 0.0), number("top_p", 1.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"input 'temperature' must be a finite number >= 0 (0 = greedy), got {temperature}")
    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=number("top_k", 0, int),
                                  seed=number("random_seed", None, int))
    except SamplingError as error:
        raise RequestError(f"input {error}") from None

    stop = []
    if "stop_words" in inputs:
        words = np.asarray(inputs["stop_words"]).reshape(-1)
        stop = [_text(word, "stop_words") for word in words]
        if any(not word for word in stop):
            raise RequestError(f"input 'stop_words' must be non-empty strings, got {stop!r}")

    eos_ids = None
    end_id = _scalar(inputs, "end_id")
    if end_id is not None:
        end_id = int(end_id)
        if not 0 <= end_id < config.vocab_size:
            raise RequestError(f"input 'end_id' must be a token id in [0, {config.vocab_size}), got {end_id}")
        eos_ids = [end_id]

    mode = _scalar(inputs, "mode")
    mode = "tidar" if mode is None else _text(mode, "mode")
    if mode not in MODES:
        raise RequestError(f"input 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    draft_len = _scalar(inputs, "draft_len")
    if draft_len is not None:
        draft_len = int(draft_len)
        if mode == "ar" and draft_len != 0:
            raise RequestError(f"input 'draft_len' = {draft_len} contradicts mode 'ar' (AR decoding drafts nothing)")
        if not 0 <= draft_len <= config.block_size:
            raise RequestError(f"input 'draft_len' must be in [0, block_size = {config.block_size}] "
                               f"(0 = AR), got {draft_len}")
    if mode == "ar":
        draft_len = 0

    timeout = _scalar(inputs, "timeout")
    if timeout is not None:
        timeout = float(timeout)
        if not (math.isfinite(timeout) and timeout > 0):
            raise RequestError(f"input 'timeout' must be positive seconds, got {timeout}")

    stream = _scalar(inputs, "stream")
    request = Request(tokenizer.encode(text), max_tokens, sampling, stop=tuple(stop), eos_ids=eos_ids)
    return ServingRequest(request, bool(stream) if stream is not None else False, draft_len, timeout)


def response_tensors(text: str, token_ids: list[int], finish_reason: str | None, delta: Delta | None) -> dict:
    """Output tensors of one response: `text` and `token_ids` are what this response adds
    (streaming) or the whole output (the single response of a non-streaming request); the
    counters are the request's totals so far."""
    stats = delta.stats if delta is not None else None

    def count(value: int) -> np.ndarray:
        return np.array([value], dtype=np.int32)

    return {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.array(token_ids, dtype=np.int32),
        "finish_reason": np.array([(finish_reason or "").encode()], dtype=np.object_),
        "num_forward_passes": count(stats.forward_passes if stats else 0),
        "num_draft_tokens": count(stats.draft_tokens if stats else 0),
        "num_accepted_draft_tokens": count(stats.accepted_tokens if stats else 0),
    }


# ---------------------------------------------------------------- the model's parameters
@dataclass
class ServingOptions:
    """The `parameters` of the Triton model (config.pbtxt), typed. Every value arrives as a string."""

    model_dir: str = "."
    """Checkpoint (torch backend) or `tidar-export build` output (onnxruntime); relative paths are
    relative to the Triton model's folder."""
    backend: str = "torch"
    """Runtime backend: torch or onnxruntime (tensorrt and trtllm on GPU hosts with those packages)."""
    draft_len: int | None = None
    """Draft length of requests that set none; "auto" (None) adapts it to the batch size."""
    max_batch_size: int = 16
    max_queue_size: int = 64
    max_tokens_limit: int = 0
    """Largest accepted `max_tokens`; 0 = the model's max_position_embeddings."""
    default_timeout: float | None = None
    """Seconds before a request ends with finish reason "timeout" ("" or 0 = none)."""
    autotune_batch_sizes: tuple[int, ...] = (1, 4, 16)
    """Batch sizes whose step latency is measured at start-up (the draft-length policy's table)."""
    autotune_draft_lens: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Candidate draft lengths of the adaptive batch."""
    autotune_repeats: int = 3
    threads: int = 0
    """torch / ONNX Runtime intra-op threads; 0 = the library's default."""
    attention: str = "sdpa"
    """Attention of the torch backend (eager, sdpa, flex, triton on CUDA); ignored by the others."""
    dtype: str | None = None
    """Compute dtype of the torch backend (float32, bfloat16, float16); empty = the checkpoint's."""

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "ServingOptions":
        fields = cls.__dataclass_fields__
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(f"config.pbtxt: unknown parameter(s) {unknown}; known: {', '.join(fields)}")
        values = {}
        for name, raw in params.items():
            raw = raw.strip()
            try:
                if name in ("max_batch_size", "max_queue_size", "max_tokens_limit", "autotune_repeats", "threads"):
                    values[name] = int(raw)
                elif name == "draft_len":
                    values[name] = None if raw in ("", "auto") else int(raw)
                elif name == "default_timeout":
                    values[name] = float(raw) if raw not in ("", "0", "none") else None
                elif name.startswith("autotune_") and name.endswith("s"):
                    values[name] = tuple(int(v) for v in raw.split(",") if v.strip())
                elif name == "dtype":
                    values[name] = raw or None
                else:
                    values[name] = raw
            except ValueError:
                raise ValueError(f"config.pbtxt: parameter '{name}' has an invalid value {raw!r}") from None
        options = cls(**values)
        if options.max_batch_size < 1 or options.max_queue_size < 0 or options.autotune_repeats < 1:
            raise ValueError("config.pbtxt: max_batch_size and autotune_repeats must be >= 1, "
                             f"max_queue_size >= 0 (got {options.max_batch_size}, {options.autotune_repeats}, "
                             f"{options.max_queue_size})")
        return options


def build_scheduler(folder, options: ServingOptions, device: str = "cpu"):
    """Load the model of `folder` on `options.backend` and start a scheduler for it.
    Returns (scheduler, tokenizer, config, max_tokens_limit)."""
    import torch

    from .autotune import BatchDraftPolicy, calibrate_acceptance, load_acceptance
    from .backend import load_backend
    from .scheduler import Scheduler, SchedulerConfig

    if options.threads > 0:
        torch.set_num_threads(options.threads)
    backend_options = {}
    if options.backend == "torch":
        backend_options.update(device=device, attention=options.attention, dtype=options.dtype)
    elif options.backend == "onnxruntime":
        backend_options["threads"] = options.threads
    backend = load_backend(options.backend, folder, **backend_options)
    tokenizer = Tokenizer(folder)
    config = backend.config
    policy = None
    if options.draft_len is None:
        acceptance = load_acceptance(folder, config.block_size) or calibrate_acceptance(backend, tokenizer)
        batch_sizes = [b for b in options.autotune_batch_sizes if b <= options.max_batch_size] or [1]
        draft_lens = [b for b in options.autotune_draft_lens if b <= config.block_size] or [0]
        policy = BatchDraftPolicy.measure(backend, acceptance, batch_sizes, draft_lens, options.autotune_repeats,
                                          tokenizer=tokenizer)
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(
        max_batch_size=options.max_batch_size, max_queue_size=options.max_queue_size,
        draft_len=options.draft_len, default_timeout=options.default_timeout), policy=policy)
    limit = options.max_tokens_limit or config.max_position_embeddings
    return scheduler, tokenizer, config, limit

"""The `tidar` Triton model's requests and responses: parsing and building them (no Triton import).

The wire contract itself (names, types, shapes) is serving/wire.py; this module gives it its
meaning. `parse_request` turns the input tensors of one request (name -> numpy array, batch
dimension of 1 included) into runtime `Request`s plus the serving options, or raises
RequestError naming the input and the value; `response_tensors` turns what a response reports
into output tensors. The model (serving/triton_model.py) only moves these between Triton
and the scheduler.

Meaning of tensorrtllm_backend's inputs here (docs/design.md §3):
- sampling inputs as TensorRT-LLM reads them (`wire.sampling_choice`: only `temperature` = greedy),
  after the checkpoint's generation_config.json defaults (`GenerationDefaults.apply`) fill the
  ones the request leaves unset (absent, or `top_p` <= 0); its end ids end generation unless the
  request sends `end_id`;
- `exclude_input_in_output` (default false): a non-streaming response's `text_output` starts with
  the prompt unless it is set; streaming responses carry only new text either way (as there);
- `num_return_sequences` = n runs n rows (seeds `seed`, `seed`+1, ...), each response tagged
  with `sequence_index`; `beam_width` must be 1; `pad_id` is checked (outputs are never padded);
- empty `stop_words` / `bad_words` strings mean none; `length_penalty` has no effect at beam
  width 1 (as in TensorRT-LLM);
- `repetition_penalty`, `presence_penalty`, `frequency_penalty`, `min_tokens` and `bad_words` are
  honoured with TensorRT-LLM's semantics (runtime/logits_processor.py, docs/design.md §3.7);
  each bad word is tokenised without special tokens, as tensorrtllm_backend's preprocessing
  model does (words that tokenise to nothing are dropped); an absent `min_tokens` is 0;
- `return_log_probs` adds `cum_log_probs` [1, 1] and `output_log_probs` [1, 1, n] (beam 1) for
  the tokens of the response: the log-probability of each token under the distribution it was
  drawn from (`SamplingBatch.choose_with_log_probs`); `cum_log_probs` is the sum over the output
  so far; `exclude_input_in_output` does not change them;
- `return_perf_metrics` adds the acceptance counters and timing outputs to every response; the
  `kv_cache_*` outputs count token slots of the request's cache row (no pages, nothing reused);
- `stop_reason` (TiDAR's own output) names the stop string that ended the output, else "";
- what would change the model input or the outputs beyond that (embedding bias, logits outputs,
  LoRA, prompt tables, guided decoding, multimodal and encoder inputs, an external draft model)
  is refused with INVALID_ARG naming the input, unless the value is the neutral one.
Beyond the contract: `draft_len`, `mode` (tidar | ar), `timeout` (seconds; the request ends with
finish reason "timeout" and the output so far) and `input_ids` (the prompt as token ids, taken as
they are instead of tokenising `text_input`, which is then only the prompt's text, the one a
non-streaming response repeats).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidar.runtime.config import TiDARConfig
from tidar.runtime.draft_shape import DraftShapeError, validate_draft_shape
from tidar.runtime.generate import Request, RequestError, Stats
from tidar.runtime.generation_config import GenerationDefaults
from tidar.runtime.sampling import SamplingError, SamplingParams
from tidar.runtime.tokenizer import Tokenizer
from .options import OptionsError, ServingOptions
from .wire import INPUT_SPECS, MODES, OUTPUT_SPECS, PERF_METRIC_OUTPUTS, sampling_choice, text_value

MAX_RETURN_SEQUENCES = 16


@dataclass
class ServingRequest:
    requests: list[Request]
    """One runtime request per returned sequence (num_return_sequences)."""
    prompt: str
    stream: bool
    draft_len: int | None
    """None: the server's adaptive draft length."""
    timeout: float | None
    exclude_input_in_output: bool = False
    return_perf_metrics: bool = False
    return_log_probs: bool = False

    @property
    def request(self) -> Request:
        return self.requests[0]


def _per_request(inputs: dict[str, np.ndarray], name: str):
    """The value of `name` for the request's one batch item (None if absent)."""
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim == 0 or array.shape[0] != 1:
        raise RequestError(f"input '{name}' must have a leading batch dimension of 1, got shape {list(array.shape)}")
    return array[0]


def _scalar(inputs: dict[str, np.ndarray], name: str):
    array = _per_request(inputs, name)
    if array is None:
        return None
    if array.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value per request, got shape "
                           f"{list(np.asarray(inputs[name]).shape)}")
    return array.reshape(-1)[0]


def _text(value, name: str) -> str:
    return text_value(value, name, RequestError)


def _words(inputs, name: str) -> list[str]:
    """A list-of-strings input; empty strings mean none (tensorrtllm_backend's quick-start sends "")."""
    array = _per_request(inputs, name)
    if array is None:
        return []
    return [word for word in (_text(item, name) for item in np.asarray(array).reshape(-1)) if word]


def _unsupported(inputs) -> None:
    """Refuse, by name, the inputs TiDAR does not honour unless their value is the neutral one."""
    def scalar(name):
        value = _scalar(inputs, name)
        return None if value is None else value.item() if hasattr(value, "item") else value

    def nonempty(name):
        array = _per_request(inputs, name)
        if array is None:
            return False
        array = np.asarray(array)
        return array.size > 0 and not (array.dtype == np.object_ and all(not bytes(v) for v in array.reshape(-1)))

    neutral = {
        "beam_width": (lambda v: v is None or v == 1, "beam search is not supported: beam_width must be 1"),
        "return_context_logits": (lambda v: not v, "logits are not returned: only false"),
        "return_generation_logits": (lambda v: not v, "logits are not returned: only false"),
        "use_draft_logits": (lambda v: not v, "TiDAR drafts itself (no draft model): only false"),
        "prompt_vocab_size": (lambda v: v is None, "prompt tuning is not supported"),
        "prompt_table_extra_id": (lambda v: v is None, "prompt tuning is not supported"),
        "lora_task_id": (lambda v: v is None, "LoRA is not supported"),
    }
    for name, (accept, reason) in neutral.items():
        value = scalar(name)
        if not accept(value):
            raise RequestError(f"input '{name}' = {value!r} is not supported: {reason}")
    for name, reason in (("embedding_bias_words", "embedding bias is not supported"),
                         ("embedding_bias_weights", "embedding bias is not supported"),
                         ("decoder_text_input", "encoder-decoder models are not supported"),
                         ("image_input", "multimodal inputs are not supported"),
                         ("image_bytes_input", "multimodal inputs are not supported"),
                         ("image_url_input", "multimodal inputs are not supported"),
                         ("video_bytes_input", "multimodal inputs are not supported"),
                         ("prompt_embedding_table", "prompt tuning is not supported"),
                         ("lora_weights", "LoRA is not supported"), ("lora_config", "LoRA is not supported"),
                         ("guided_decoding_guide_type", "guided decoding is not supported"),
                         ("guided_decoding_guide", "guided decoding is not supported")):
        if nonempty(name):
            raise RequestError(f"input '{name}' is not supported: {reason}")


def _prompt_ids(inputs, config: TiDARConfig) -> list[int] | None:
    """The `input_ids` input (the prompt as token ids), checked; None when absent."""
    array = _per_request(inputs, "input_ids")
    if array is None:
        return None
    ids = [int(token) for token in np.asarray(array).reshape(-1)]
    if not ids:
        raise RequestError("input 'input_ids' is empty: at least one token is needed")
    for position, token in enumerate(ids):
        if not 0 <= token < config.vocab_size:
            raise RequestError(f"input 'input_ids' must hold token ids in [0, {config.vocab_size}), got {token} at "
                               f"position {position}")
    return ids


def parse_request(inputs: dict[str, np.ndarray], tokenizer: Tokenizer, config: TiDARConfig,
                  max_tokens_limit: int, defaults: GenerationDefaults | None = None) -> ServingRequest:
    """The runtime requests of one Triton request's inputs; RequestError names what is wrong.
    `defaults`: the model's generation_config.json (end ids, sampling defaults)."""
    unknown = set(inputs) - set(INPUT_SPECS)
    if unknown:
        raise RequestError(f"unknown input(s) {sorted(unknown)}")
    if "text_input" not in inputs:
        raise RequestError("input 'text_input' is missing")
    text = _text(_scalar(inputs, "text_input"), "text_input")
    prompt_ids = _prompt_ids(inputs, config)
    if not text and prompt_ids is None:
        raise RequestError("input 'text_input' is empty: at least one token is needed")
    max_tokens = _scalar(inputs, "max_tokens")
    if max_tokens is None:
        raise RequestError("input 'max_tokens' is missing")
    max_tokens = int(max_tokens)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"input 'max_tokens' must be in [1, {max_tokens_limit}], got {max_tokens}")
    _unsupported(inputs)

    def number(name, kind=float):
        value = _scalar(inputs, name)
        return None if value is None else kind(value)

    temperature = number("temperature")
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise RequestError(f"input 'temperature' must be a finite number >= 0 (0 = greedy), got {temperature}")
    top_p = number("top_p")
    if top_p is not None and not (math.isfinite(top_p) and top_p <= 1):
        raise RequestError(f"input 'top_p' must be <= 1 (<= 0 = unset), got {top_p}")
    seed, old_seed = number("seed", int), number("random_seed", int)
    if seed is not None and old_seed is not None and seed != old_seed:
        raise RequestError(f"inputs 'seed' = {seed} and 'random_seed' = {old_seed} disagree (send one)")
    seed = seed if seed is not None else old_seed
    top_k = number("top_k", int)
    if defaults is not None:  # the checkpoint's defaults fill what the request leaves unset
        chosen = defaults.apply({"temperature": temperature, "top_k": top_k,
                                 "top_p": top_p if top_p is not None and top_p > 0 else None})
        temperature, top_k, top_p = chosen["temperature"], chosen["top_k"], chosen["top_p"]
    temperature, top_k, top_p = sampling_choice(temperature, top_k, top_p)
    processors = {}  # penalties, min_tokens, bad words: left at SamplingParams' neutral values when absent
    for name, kind in (("repetition_penalty", float), ("presence_penalty", float), ("frequency_penalty", float),
                       ("min_tokens", int)):
        value = number(name, kind)
        if value is not None:
            processors[name] = value
    bad_words = [tuple(tokenizer.encode(word, add_special_tokens=False)) for word in _words(inputs, "bad_words")]
    processors["bad_words"] = tuple(word for word in bad_words if word)
    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, **processors)
    except SamplingError as error:
        raise RequestError(f"input {error}") from None

    stop = _words(inputs, "stop_words")
    eos_ids = defaults.eos_ids if defaults is not None else None
    for name in ("end_id", "pad_id"):
        token = number(name, int)
        if token is not None and not 0 <= token < config.vocab_size:
            raise RequestError(f"input '{name}' must be a token id in [0, {config.vocab_size}), got {token}")
        if name == "end_id" and token is not None:
            eos_ids = [token]

    mode = _scalar(inputs, "mode")
    mode = "tidar" if mode is None else _text(mode, "mode")
    if mode not in MODES:
        raise RequestError(f"input 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    draft_len = number("draft_len", int)
    if draft_len is not None:
        if mode == "ar" and draft_len != 0:
            raise RequestError(f"input 'draft_len' = {draft_len} contradicts mode 'ar' (AR decoding drafts nothing)")
        try:
            validate_draft_shape(config, draft_len, names=("input 'draft_len'", "input 'draft_blocks'"))
        except DraftShapeError as error:
            raise RequestError(str(error)) from None
    if mode == "ar":
        draft_len = 0

    timeout = number("timeout")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise RequestError(f"input 'timeout' must be positive seconds, got {timeout}")
    count = number("num_return_sequences", int)
    count = 1 if count is None else count
    if not 1 <= count <= MAX_RETURN_SEQUENCES:
        raise RequestError(f"input 'num_return_sequences' must be in [1, {MAX_RETURN_SEQUENCES}], got {count}")

    if prompt_ids is None:
        prompt_ids = tokenizer.encode(text)
    flag = lambda name: bool(_scalar(inputs, name)) if name in inputs else False  # noqa: E731
    log_probs = flag("return_log_probs")
    requests = []
    for index in range(count):
        row_sampling = sampling
        if index and seed is not None:
            row_sampling = dataclasses.replace(sampling, seed=(seed + index) % 2 ** 64)
        requests.append(Request(prompt_ids, max_tokens, row_sampling, stop=tuple(stop), eos_ids=eos_ids,
                                return_log_probs=log_probs))
    return ServingRequest(requests, text, flag("stream"), draft_len, timeout,
                          exclude_input_in_output=flag("exclude_input_in_output"),
                          return_perf_metrics=flag("return_perf_metrics"), return_log_probs=log_probs)


@dataclass
class Timing:
    """Wall-clock times of one returned sequence (ns since the epoch), for the perf-metric outputs."""

    arrival_ns: int
    first_scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    cache_slots: int = 0
    """KV-cache slots the sequence's row holds (prompt + output so far): the `kv_cache_alloc_*`
    outputs, counting one token slot as a block (runtime/cache.py has no pages and no reuse)."""


def response_tensors(text: str, token_ids: list[int], finish_reason: str | None, stats: Stats | None,
                     sequence_index: int | None = None, timing: Timing | None = None,
                     log_probs: tuple[list[float], float] | None = None, stop_reason: str = "") -> dict:
    """Output tensors of one response, batch dimension included: `text` and `token_ids` are what
    this response adds (streaming) or the whole output (the single response of a non-streaming
    request); the counters are `stats`, the request's totals so far (the sum of its deltas'
    `step_stats`; None: zeros). `sequence_index` is sent when the request asked for several
    sequences, the perf metrics when `timing` is given, the log probs (those of `token_ids`, and
    the sum over the output so far) when `log_probs` is; `stop_reason` is the stop string that
    ended the output ("" otherwise)."""
    draft_tokens = stats.draft_tokens if stats else 0
    accepted = stats.accepted_tokens if stats else 0

    def one(name: str, value) -> np.ndarray:
        return np.array([[value]], dtype=OUTPUT_SPECS[name].numpy_dtype)

    tensors = {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.array([token_ids], dtype=np.int32).reshape(1, -1),
        "finish_reason": one("finish_reason", (finish_reason or "").encode()),
        "num_forward_passes": one("num_forward_passes", stats.forward_passes if stats else 0),
        "num_draft_tokens": one("num_draft_tokens", draft_tokens),
        "num_accepted_draft_tokens": one("num_accepted_draft_tokens", accepted),
        "stop_reason": one("stop_reason", stop_reason.encode("utf-8")),
    }
    if sequence_index is not None:
        tensors["sequence_index"] = one("sequence_index", sequence_index)
    if log_probs is not None:
        tokens_log_probs, cumulative = log_probs
        tensors["cum_log_probs"] = one("cum_log_probs", cumulative)  # [batch, beam]
        tensors["output_log_probs"] = np.array(tokens_log_probs, dtype=OUTPUT_SPECS["output_log_probs"].numpy_dtype
                                               ).reshape(1, 1, -1)  # [batch, beam, tokens]
    if timing is not None:
        values = {"kv_cache_alloc_new_blocks": timing.cache_slots, "kv_cache_reused_blocks": 0,
                  "kv_cache_alloc_total_blocks": timing.cache_slots,
                  "arrival_time_ns": timing.arrival_ns, "first_scheduled_time_ns": timing.first_scheduled_ns,
                  "first_token_time_ns": timing.first_token_ns, "last_token_time_ns": timing.last_token_ns,
                  "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
                  "total_accepted_draft_tokens": accepted, "total_draft_tokens": draft_tokens}
        tensors.update({name: one(name, values[name]) for name in PERF_METRIC_OUTPUTS})
    return tensors


def matched_stop(tokenizer: Tokenizer, token_ids: list[int], text: str, stop) -> str:
    """The stop string that ended an output of `token_ids` whose text, cut before the stop
    string, is `text`: the first of `stop` in the tokens' decoded text after `text` ("" if none)."""
    if not stop:
        return ""
    full = tokenizer.decode(token_ids)
    start = len(text) if full.startswith(text) else 0
    found = [(full.find(word, start), word) for word in stop if full.find(word, start) >= 0]
    return min(found)[1] if found else ""


def _autotune_cache(folder, options: ServingOptions, device: str):
    """Where this model's start-up measurement is kept across restarts of one `tidar serve`
    (the folder it names in the environment; None without it): a restarted server reuses the
    draft-length policy measured on the same machine minutes before instead of measuring again."""
    from .supervisor import AUTOTUNE_CACHE_ENV

    root = os.environ.get(AUTOTUNE_CACHE_ENV)
    if not root:
        return None
    key = json.dumps([str(folder), device, dataclasses.asdict(options)], sort_keys=True, default=str)
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root) / f"autotune-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def check_backend_limits(backend, options: ServingOptions) -> None:
    """Refuse serving options that would ask the backend for more rows than it takes: an engine
    (`EngineBackend.max_batch_size`, from its optimization profile) serves at most the batch it
    was built for, so `max_batch_size` (and every autotuned batch, which never exceeds it) must fit."""
    limit = getattr(backend, "max_batch_size", None)
    if limit is not None and options.max_batch_size > limit:
        raise OptionsError(f"max_batch_size {options.max_batch_size} exceeds the {backend.name} engine's "
                           f"optimization profile (built for at most {limit} rows); set max_batch_size <= {limit} "
                           "(`tidar-export build` renders it from the engine it built) or build the engine for more rows")


STARTUP_PREFIX = "tidar start-up:"
"""Start of the lines a model prints on stderr while it starts (`startup_log`); `tidar serve`
shows them while it waits for the server to be ready."""


def startup_log(line: str) -> None:
    """One start-up progress line on stderr (the server's log), flushed at once."""
    print(f"{STARTUP_PREFIX} {line}", file=sys.stderr, flush=True)


def race_budget(budget: float, spent: float) -> float:
    """Seconds the start-up race of draft shapes may take after the acceptance estimate took
    `spent` of the autotune `budget`: what is left, but never less than half the budget. One
    prompt's replay cannot be cut short, and a large model's may take the whole budget (124 s
    for Qwen3-1.7B on the development machine, against 60): the race then still measures the
    shapes instead of timing AR alone, and start-up takes at most 1.5 budgets plus one prompt."""
    return max(budget - spent, budget / 2)


def default_threads() -> int:
    """Intra-op threads of a served model when the repository sets none (`threads` 0): half the
    CPUs this process may run on, at least one. The other half stays for what serves the tokens
    besides the model: tritonserver, the OpenAI front, the model's response thread. On the
    2-CPU development machine, one ONNX Runtime thread instead of two took AIPerf's AR output at
    concurrency 16 from 631 to 806 tokens/s (docs/serving.md, "Threads")."""
    import os

    return max(1, len(os.sched_getaffinity(0)) // 2)


def build_scheduler(folder, options: ServingOptions, device: str = "cpu", progress=startup_log):
    """Load the model of `folder` on `options.backend` and start a scheduler for it; `progress`
    gets a line for each start-up stage (the draft-shape autotune's estimate and measurement).
    Returns (scheduler, tokenizer, config, max_tokens_limit)."""
    import torch

    from tidar.runtime.autotune import BatchDraftPolicy, candidate_draft_lens, draft_shapes, shape_name
    from tidar.runtime.calibrate import startup_estimate
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.generate import DecodeEngine
    from .scheduler import Scheduler, SchedulerConfig

    threads = options.threads or default_threads()
    torch.set_num_threads(threads)
    backend_options = {}
    if options.backend == "torch":
        backend_options.update(device=device, attention=options.attention, dtype=options.dtype,
                               cuda_graphs=options.cuda_graphs)
    elif options.backend == "onnxruntime":
        backend_options["threads"] = threads
    else:  # an engine: deserialized on this instance's GPU
        backend_options["device"] = device
    progress(f"loading {folder} on {options.backend}")
    backend = load_backend(options.backend, folder, **backend_options)
    check_backend_limits(backend, options)
    tokenizer = Tokenizer(folder)
    config = backend.config
    policy = None
    if options.draft_len is None:
        cache = _autotune_cache(folder, options, device)
        if cache is not None and cache.is_file():
            policy = BatchDraftPolicy.from_json(json.loads(cache.read_text()))
            progress(f"draft-shape policy measured by an earlier start of this server ({cache.name})")
        else:
            started = time.monotonic()
            draft_lens = candidate_draft_lens(config, options.autotune_draft_lens)
            progress(f"autotune: draft lengths {draft_lens} (of autotune_draft_lens {list(options.autotune_draft_lens)} "
                     f"the trained ones), budget {options.autotune_budget:g} s")
            acceptance, replayed, source = startup_estimate(backend, tokenizer, folder, options.autotune_budget / 2,
                                                            [b for b in draft_lens if b])
            progress(f"autotune: expected tokens per step from {source}")
            batch_sizes = [b for b in options.autotune_batch_sizes if b <= options.max_batch_size] or [1]
            shapes = draft_shapes(draft_lens, options.autotune_draft_blocks)
            policy = BatchDraftPolicy.measure(backend, acceptance, batch_sizes, shapes, options.autotune_repeats,
                                              tokenizer=tokenizer, replayed=replayed,
                                              budget_s=race_budget(options.autotune_budget,
                                                                   time.monotonic() - started),
                                              progress=lambda line: progress(f"autotune: {line}"))
            progress(f"autotune: done in {time.monotonic() - started:.1f} s; batch 1 uses "
                     f"{shape_name(policy.best(1))}")
            if cache is not None:  # atomically: instances of one model may start together
                partial = cache.with_suffix(f".{os.getpid()}.tmp")
                partial.write_text(json.dumps(policy.to_json()))
                os.replace(partial, cache)
    graphed = getattr(backend, "graphs", None) is not None  # CUDA graphs: a cache that never grows
    scheduler = Scheduler(backend, tokenizer, SchedulerConfig(
        max_batch_size=options.max_batch_size, max_queue_size=options.max_queue_size,
        draft_len=options.draft_len, default_timeout=options.default_timeout, drafter=options.drafter,
        verify_only=options.verify_only,
        max_len=DecodeEngine(backend).max_slots() if graphed else None), policy=policy)
    if graphed:  # every graph before the server reports ready; none captured while serving
        started = time.monotonic()
        captured = scheduler.prepare_graphs()
        progress(f"CUDA graphs: {captured} decode steps captured in {time.monotonic() - started:.1f} s "
                 f"(cache of {options.max_batch_size} rows x {scheduler.config.max_len} slots)")
    limit = options.max_tokens_limit or config.max_position_embeddings
    return scheduler, tokenizer, config, limit

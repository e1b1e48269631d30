"""The Triton Python-backend model `tidar`: TiDAR generation with continuous batching (decoupled).

triton_repo/tidar/1/model.py imports `TritonPythonModel` from here; Triton runs it in the model
process, where `triton_python_backend_utils` exists.

Only the Triton plumbing lives here; the rest is tidar's runtime:
- the request tensors are parsed by `tidar.serving.requests.parse_request` (a bad request gets an
  INVALID_ARG error response naming the input; the other requests are untouched);
- requests go to a `tidar.serving.scheduler.Scheduler`, whose thread batches them into shared
  decode steps and calls back with each step's delta;
- a streaming request gets one response per decode step with its new text and the final
  flag on the last, sent by a thread of their own (serving/responses.py): when responses queue up
  faster than they are sent, one sequence's queued ones are merged into one; a non-streaming request gets one response with the whole output (the prompt
  first unless `exclude_input_in_output`); with `num_return_sequences` = n, n rows run and each
  response names its `sequence_index`; the final flag comes with the last one;
- a full queue gives an UNAVAILABLE "overloaded" error; a cancelled request or a closed
  stream frees its row at the next step;
- scheduler counters, and each returned sequence's time to first token and inter-token
  latencies, are published on Triton's metrics endpoint (`Metrics`: vLLM's names for the
  speculative-decoding counters and the latency histograms, `tidar_*` for the rest) by a thread of
  their own every PUBLISH_SECONDS (each metric update is an IPC call to the server; the decode
  loop never waits for them).
"""

import dataclasses
import json
import threading
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils

from tidar.runtime.generate import RequestError, Stats
from tidar.runtime.generation_config import GenerationDefaults
from .options import ServingOptions
from .requests import Timing, build_scheduler, matched_stop, parse_request, response_tensors
from .responses import Outgoing, ResponseQueue
from .scheduler import Overloaded
from .supervisor import restarts_from_environment
from .wire import INPUTS, request_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TOKENS_PER_FORWARD_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16]
PUBLISH_SECONDS = 0.2


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        params.setdefault("repository_format", "")  # a repository that names none is an older one
        options = ServingOptions.from_parameters(params)
        options.check_format(f"{args['model_repository']}/config.pbtxt")
        folder = Path(options.model_dir)
        if not folder.is_absolute():
            folder = Path(args["model_repository"]) / folder
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.metrics = Metrics({"model": args["model_name"], "version": args["model_version"]})
        self.scheduler, self.tokenizer, self.config, self.max_tokens_limit = build_scheduler(
            folder.resolve(), options, device=device)
        self.defaults = GenerationDefaults.from_folder(folder.resolve())  # generation_config.json
        self.responses = ResponseQueue(lambda item: item.reply.send(item))  # sends off the decode loop
        self.stop_publishing = threading.Event()
        self.publisher = threading.Thread(target=self._publish_loop, name="tidar-metrics", daemon=True)
        self.publisher.start()

    def _publish_loop(self):
        while not self.stop_publishing.wait(PUBLISH_SECONDS):
            try:
                self.metrics.publish(self.scheduler.snapshot())
            except Exception:  # metrics must never take the model down
                pass

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None

    def _submit(self, request):
        arrival = time.time_ns()
        sender = request.get_response_sender()
        inputs = request_inputs(request, INPUTS, pb_utils.get_input_tensor_by_name)
        try:
            parsed = parse_request(inputs, self.tokenizer, self.config, self.max_tokens_limit, self.defaults)
        except RequestError as error:
            self.metrics.rejected("invalid")
            return _send_error(sender, str(error), pb_utils.TritonError.INVALID_ARG)
        reply = Reply(sender, parsed, arrival, self.tokenizer, self.metrics, self.responses)
        for index, row in enumerate(parsed.requests):
            try:
                self.scheduler.submit(row, reply.callbacks(index), reply.on_error, draft_len=parsed.draft_len,
                                      timeout=parsed.timeout, is_cancelled=reply.is_cancelled)
            except Overloaded as error:
                reply.fail(str(error), pb_utils.TritonError.UNAVAILABLE)
                return
            except RequestError as error:
                self.metrics.rejected("invalid")
                reply.fail(str(error), pb_utils.TritonError.INVALID_ARG)
                return

    def finalize(self):
        self.scheduler.close()
        self.responses.close()
        self.stop_publishing.set()
        self.publisher.join(5)


class Reply:
    """One request's responses: updated from the scheduler's thread (`on_delta`), sent by the
    model's `ResponseQueue` (serving/responses.py). With several returned sequences, the final flag
    goes with the last sequence to finish, and a failure of one ends all."""

    def __init__(self, sender, parsed, arrival_ns: int, tokenizer=None, metrics=None, queue=None):
        self.sender, self.parsed, self.tokenizer, self.metrics = sender, parsed, tokenizer, metrics
        self.queue = queue
        """Where the updates go (None: sent at once, on the caller's thread)."""
        count = len(parsed.requests)
        self.text = [[] for _ in range(count)]  # per sequence, the text and tokens of its output so far
        self.token_ids = [[] for _ in range(count)]
        self.log_probs = [[] for _ in range(count)]  # per sequence, the output's so far
        self.stats = [Stats() for _ in range(count)]  # per sequence, the sums of its deltas' increments
        self.timing = [Timing(arrival_ns) for _ in range(count)]
        self.open = count
        self.closed = False
        """The final response or an error was queued: nothing more is."""
        self.broken = False
        """A send failed (the client is gone): the scheduler ends the rows at its next poll."""
        self.lock = threading.Lock()

    def is_cancelled(self) -> bool:
        return self.closed or self.broken or self.sender.is_cancelled()

    def callbacks(self, index: int):
        return lambda delta: self.on_delta(index, delta)

    def on_delta(self, index, delta):
        timing, stats = self.timing[index], self.stats[index]
        stats.add(delta.step_stats)
        now = time.time_ns()
        if delta.token_ids:
            if not timing.first_token_ns:
                timing.first_token_ns = now
                prefill = stats.prefill_seconds
                timing.first_scheduled_ns = max(timing.arrival_ns, now - int(prefill * 1e9))
                if self.metrics is not None:
                    self.metrics.observe("ttft", (now - timing.arrival_ns) / 1e9)
            elif self.metrics is not None:
                self.metrics.observe("itl", (now - timing.last_token_ns) / 1e9)
            timing.last_token_ns = now
        self.log_probs[index].extend(delta.log_probs or ())
        self.text[index].append(delta.text)
        self.token_ids[index].extend(delta.token_ids)
        request = self.parsed.requests[index]
        timing.cache_slots = len(request.prompt_ids) + len(self.token_ids[index])
        stop_reason = ""
        if delta.finish_reason == "stop" and self.tokenizer is not None:
            stop_reason = matched_stop(self.tokenizer, self.token_ids[index], "".join(self.text[index]), request.stop)
        if self.parsed.stream:
            text, token_ids = delta.text, list(delta.token_ids)
            log_probs = list(delta.log_probs or ())
        else:
            if not delta.finished:
                return
            text, token_ids, log_probs = "".join(self.text[index]), list(self.token_ids[index]), self.log_probs[index]
            if not self.parsed.exclude_input_in_output:
                text = self.parsed.prompt + text
        # what response_tensors reads of the counters and timings, as they are now
        state = {"finish_reason": delta.finish_reason, "stop_reason": stop_reason,
                 "stats": Stats(forward_passes=stats.forward_passes, draft_tokens=stats.draft_tokens,
                                accepted_tokens=stats.accepted_tokens),
                 "timing": dataclasses.replace(timing) if self.parsed.return_perf_metrics else None,
                 "cumulative_log_prob": sum(self.log_probs[index])}
        with self.lock:
            if self.closed:
                return
            if delta.finished:
                self.open -= 1
            final = self.open == 0
            self.closed = final
        self._queue(Outgoing(self, index, text, token_ids, list(log_probs), state, final))

    def send(self, item: Outgoing) -> None:
        """Send one (possibly merged) update or error (the response queue's thread)."""
        if item.error is not None:
            message, code = item.error
            _send_error(self.sender, message, code)
            return
        state = item.state
        tensors = response_tensors(item.text, item.token_ids, state["finish_reason"], state["stats"],
                                   sequence_index=item.index if len(self.timing) > 1 else None,
                                   timing=state["timing"],
                                   log_probs=(item.log_probs, state["cumulative_log_prob"])
                                   if self.parsed.return_log_probs else None, stop_reason=state["stop_reason"])
        response = pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in tensors.items()])
        try:
            self.sender.send(response, flags=FINAL if item.final else 0)
        except Exception:
            self.broken = True

    def _queue(self, item: Outgoing) -> None:
        if self.queue is None:
            self.send(item)
            if self.broken:
                raise RuntimeError("the response stream is closed")
        else:
            self.queue.put(item)

    def on_error(self, kind, message):
        self.fail(message, pb_utils.TritonError.INVALID_ARG if kind == "invalid" else pb_utils.TritonError.INTERNAL)

    def fail(self, message, code):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self._queue(Outgoing(self, error=(message, code), final=True))


def _send_error(sender, message, code):
    try:
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
    except Exception:  # the client is gone; nothing to tell
        pass


class Metrics:
    """Scheduler counters as Triton custom metrics (docs/serving.md, "Metrics"). The speculative-
    decoding counters and the latency histograms carry vLLM's names (`vllm:spec_decode_*`,
    `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`: Triton takes ':' in a
    metric name), so vLLM's dashboards read them; the rest are `tidar_*`. Counters are incremented
    by what changed since the last publish; the latencies observed by the request threads are
    queued here and handed to Triton by the publishing thread."""

    COUNTERS = {  # SchedulerCounters field: (metric name, help)
        "forward_passes": ("tidar_forward_passes_total", "Model forwards (prefills and decode steps)"),
        "row_forwards": ("tidar_row_forwards_total", "Rows summed over model forwards"),
        "generated_tokens": ("tidar_generated_tokens_total", "Tokens generated"),
        "drafts": ("vllm:spec_decode_num_drafts_total", "Row steps that verified drafts"),
        "draft_tokens": ("vllm:spec_decode_num_draft_tokens_total", "Draft tokens verified"),
        "accepted_tokens": ("vllm:spec_decode_num_accepted_tokens_total", "Draft tokens accepted"),
    }
    TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
    """vLLM's buckets of vllm:time_to_first_token_seconds."""
    ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0]
    """vLLM's buckets of vllm:inter_token_latency_seconds."""

    def __init__(self, labels):
        self.labels = labels
        vllm_labels = {**labels, "model_name": labels["model"]}  # vLLM's dashboards select on model_name
        self.lock = threading.Lock()
        counter, gauge, histogram = (pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE,
                                     pb_utils.MetricFamily.HISTOGRAM)
        self.families = []  # a MetricFamily must outlive its Metric objects

        def family(name, text, kind):
            self.families.append(pb_utils.MetricFamily(name, text, kind))
            return self.families[-1]

        self.counters = {field: family(name, text, counter).Metric(
                             labels=vllm_labels if name.startswith("vllm:") else labels)
                         for field, (name, text) in self.COUNTERS.items()}
        self.requests_family = family(
            "tidar_requests_total", "Finished requests by outcome (stop, length, cancelled, timeout, invalid, "
            "overloaded, error)", counter)
        self.position_family = family(
            "vllm:spec_decode_num_accepted_tokens_per_pos_total",
            "Accepted draft tokens by draft position (0 = the first drafted token)", counter)
        self.gauges = {name: family(f"tidar_{name}", text, gauge).Metric(labels=labels)
                       for name, text in (("queue_depth", "Requests waiting for a row"),
                                          ("active_rows", "Rows in the decode batch"),
                                          ("draft_len", "Current draft length of the adaptive batch"))}
        self.histogram = family(
            "tidar_tokens_per_forward", "Tokens committed per row per forward", histogram,
        ).Metric(labels=labels, buckets=TOKENS_PER_FORWARD_BUCKETS)
        self.latency = {
            "ttft": family("vllm:time_to_first_token_seconds", "Time from a request's arrival to its first "
                           "token, per returned sequence", histogram).Metric(labels=vllm_labels,
                                                                             buckets=self.TTFT_BUCKETS),
            "itl": family("vllm:inter_token_latency_seconds", "Time between two decode steps that give a returned "
                          "sequence new tokens", histogram).Metric(labels=vllm_labels, buckets=self.ITL_BUCKETS)}
        self.vllm_labels = vllm_labels
        self.latencies: list[tuple[str, float]] = []  # (ttft | itl, seconds) not yet handed to Triton
        self.labelled = {}
        self.published = {}
        restarts = family("tidar_server_restarts_total", "Restarts of this server by `tidar serve` after a dead "
                          "model process or tritonserver, by cause (model_process, tritonserver)", counter)
        for cause, count in restarts_from_environment().items():
            self._labelled(restarts, "cause", cause).increment(count)

    def _labelled(self, family, key, value):
        metric = self.labelled.get((key, value))
        if metric is None:
            base = self.vllm_labels if family is self.position_family else self.labels
            metric = self.labelled[(key, value)] = family.Metric(labels={**base, key: str(value)})
        return metric

    def _advance(self, key, metric, total):
        change = total - self.published.get(key, 0)
        if change:
            metric.increment(change)
            self.published[key] = total

    def rejected(self, outcome):
        with self.lock:
            self._labelled(self.requests_family, "outcome", outcome).increment(1)

    def observe(self, kind: str, seconds: float) -> None:
        """Queue a latency ("ttft" or "itl"); no call to Triton here (the decode loop calls this)."""
        with self.lock:
            self.latencies.append((kind, seconds))

    def publish(self, counters):
        with self.lock:
            latencies, self.latencies = self.latencies, []
            for name, metric in self.counters.items():
                self._advance(name, metric, getattr(counters, name))
            for outcome, total in counters.requests.items():
                self._advance(("requests", outcome), self._labelled(self.requests_family, "outcome", outcome), total)
            for index, total in enumerate(counters.accepted_per_position):
                self._advance(("position", index), self._labelled(self.position_family, "position", index), total)
            for name, metric in self.gauges.items():
                metric.set(getattr(counters, name))
            for value in counters.drain_observations():
                self.histogram.observe(value)
        for kind, seconds in latencies:
            self.latency[kind].observe(seconds)

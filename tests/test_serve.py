"""Integration: the real Triton Inference Server (nvidia-pytriton's tritonserver) serving the
bundled model through triton_repo/, driven with NVIDIA's tritonclient over gRPC.

The oracle for every greedy output is AR decoding of the same weights in this process
(DecodeEngine at draft length 0, itself tested against transformers); `tidar generate` is
compared as the user would run it. Server and oracle compute in float32 with eager attention:
batched and solo rows then agree exactly, whereas in bfloat16 a near-tie may flip with the
batch's shape. The server runs two models rendered from the templates:
`tidar` (adaptive draft length, 16 rows) and `tidar_small` (one row, a queue of one) for the
overload test.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tritonclient.grpc as grpcclient

from tidar import BUNDLED_MODEL
from tidar.serving.client import ClientError, build_inputs, request
from tidar.serving.repository import render_repository
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.sampling import SamplingParams
from tidar.runtime.tokenizer import Tokenizer
from tidar.serving.wire import PERF_METRIC_OUTPUTS

from serving_helpers import metrics, running_server, settled_metrics, wait_for

PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Config:\n    def __init__(self", "# Copyright",
           "for key, value in", "    return self.", "if __name__ == '__main__':\n", "try:\n    import",
           "def _make_", "with open(path) as f:\n", "raise ValueError(", "@property\ndef ",
           "self.assertEqual(", "from collections import", "x = [", "while True:\n"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    repo = render_repository(root / "repo", model_dir=str(BUNDLED_MODEL), backend="torch", dtype="float32",
                             attention="eager", threads=1,
                             autotune_batch_sizes="1,4,16", autotune_draft_lens="0,2,4", autotune_repeats=2)
    small = repo / "tidar_small"
    shutil.copytree(repo / "tidar", small)
    config = (small / "config.pbtxt").read_text().replace('name: "tidar"', 'name: "tidar_small"')
    for key, value in (("max_batch_size", "1"), ("max_queue_size", "1"), ("draft_len", "2")):
        config = re.sub(rf'(key: "{key}" value: {{ string_value: )"[^"]*"', rf'\1"{value}"', config)
    (small / "config.pbtxt").write_text(config)
    with running_server(repo) as running:
        yield running


@pytest.fixture(scope="module")
def ar_oracle():
    engine = DecodeEngine(TorchBackend.load(BUNDLED_MODEL, dtype="float32"), Tokenizer(BUNDLED_MODEL), draft_len=0)
    tokenizer = engine.tokenizer

    def greedy(text: str, max_tokens: int):
        return engine.generate([Request(tokenizer.encode(text), max_tokens)])[0]

    greedy.engine = engine
    return greedy


def test_streamed_text_equals_tidar_generate(server, ar_oracle):
    prompt = "def main():\n"
    cli = subprocess.run([sys.executable, "-m", "tidar.cli", "generate", "--prompt", prompt, "--max-new-tokens", "40",
                          "--draft-len", "3", "--dtype", "float32", "--json"],
                         capture_output=True, text=True, check=True)
    generated = json.loads(cli.stdout)
    pieces = []
    streamed = request(server.grpc_url, prompt, 40, on_text=pieces.append)
    assert streamed.token_ids == generated["token_ids"] == ar_oracle(prompt, 40).token_ids
    assert streamed.text == generated["text"] == "".join(pieces)
    assert len(streamed.arrivals) > 1 and streamed.finish_reason == "length"
    whole = request(server.grpc_url, prompt, 40, stream=False)
    assert (whole.text, whole.token_ids, len(whole.arrivals)) == (streamed.text, streamed.token_ids, 1)


def test_sixteen_concurrent_streams_equal_their_solo_output(server, ar_oracle):
    lengths = [24 + 5 * (i % 5) for i in range(16)]
    before = settled_metrics(server)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda a: request(server.grpc_url, *a), zip(PROMPTS, lengths)))
    after = settled_metrics(server)
    for prompt, length, result in zip(PROMPTS, lengths, results):
        assert result.token_ids == ar_oracle(prompt, length).token_ids, prompt
    forwards = after["tidar_forward_passes_total"] - before["tidar_forward_passes_total"]
    rows = after["tidar_row_forwards_total"] - before["tidar_row_forwards_total"]
    assert rows > 2 * forwards, f"requests were not batched: {rows} rows in {forwards} forwards"


def test_seeded_requests_repeat_under_concurrent_load(server):
    """Three seeded sampled requests, each sent four times at concurrency 16 among
    greedy and unseeded requests of other lengths (so the adaptive draft length changes as the
    batch grows and shrinks), get one answer each: the one the request gets alone in AR mode."""
    seeded = [(PROMPTS[i], 40, dict(temperature=t, top_p=p, random_seed=s))
              for i, t, p, s in ((0, 0.8, 1.0, 11), (3, 1.0, 0.9, 12), (8, 0.8, 0.95, 2 ** 63 + 13))]
    others = [(PROMPTS[i], 16 + 3 * i, dict(temperature=0.9) if i % 2 else {}) for i in range(4, 8)]
    load = seeded * 4 + others
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda a: request(server.grpc_url, a[0], a[1], **a[2]), load))
    for index, (prompt, length, options) in enumerate(seeded):
        answers = {tuple(results[index + 3 * k].token_ids) for k in range(4)}
        alone = request(server.grpc_url, prompt, length, mode="ar", **options)
        assert answers == {tuple(alone.token_ids)}, prompt
    assert len({tuple(r.token_ids) for r in results[:3]}) == 3


BAD_REQUESTS = {
    "missing text_input": (dict(drop="text_input"), r"text_input"),
    "max_tokens 0": (dict(max_tokens=0), r"'max_tokens' must be in \[1, 2048\], got 0"),
    "max_tokens above the limit": (dict(max_tokens=5000), r"'max_tokens' must be in \[1, 2048\], got 5000"),
    "wrong dtype": (dict(retype=("max_tokens", "FP32", np.float32)), r"max_tokens.*(FP32|TYPE_FP32)"),
    "negative temperature": (dict(temperature=-1.0), r"'temperature' must be a finite number >= 0"),
    "top_p above 1": (dict(top_p=1.5), r"'top_p' must be <= 1"),
    "beam search": (dict(beam_width=2), r"'beam_width' = 2 is not supported"),
    "LoRA": (dict(lora_task_id=3), r"'lora_task_id' = 3 is not supported: LoRA"),
    "zero repetition penalty": (dict(repetition_penalty=0.0), r"input repetition_penalty must be a finite number > 0"),
    "negative min_tokens": (dict(min_tokens=-1), r"input min_tokens must be an integer >= 0"),
    "prompt over the context limit": (dict(text="x = 1\n" * 1200), r"prompt of \d+ tokens is too long"),
}


def send_raw(server, text="def f():", max_tokens=16, drop=None, retype=None, model="tidar", **options):
    """One request built by hand (to send what `client.request` would refuse to build)."""
    inputs = build_inputs(text, max_tokens, True, **options)
    if drop:
        inputs = [t for t in inputs if t.name() != drop]
    if retype:
        name, kind, dtype = retype
        inputs = [t for t in inputs if t.name() != name]
        tensor = grpcclient.InferInput(name, [1, 1], kind)
        tensor.set_data_from_numpy(np.array([[max_tokens]], dtype=dtype))
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    errors, done = [], []
    client.start_stream(callback=lambda result, error: (errors.append(error) if error else None, done.append(1)))
    client.async_stream_infer(model, inputs)
    wait_for(lambda: done, 30)
    client.stop_stream()
    return [str(e) for e in errors if e]


def test_bad_requests_get_errors_while_good_streams_finish(server, ar_oracle):
    good = PROMPTS[:4]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, server.grpc_url, p, 48) for p in good]
        for name, (options, pattern) in BAD_REQUESTS.items():
            errors = send_raw(server, **options, model="ensemble" if "beam" in name else "tidar")
            assert len(errors) == 1 and re.search(pattern, errors[0]), f"{name}: {errors}"
        results = [f.result() for f in futures]
    for prompt, result in zip(good, results):
        assert result.token_ids == ar_oracle(prompt, 48).token_ids
    with pytest.raises(ClientError, match="'mode' must be one of tidar, ar"):
        request(server.grpc_url, "x", 4, mode="fast")


def test_cancelled_and_disconnected_clients_free_their_rows(server, ar_oracle):
    before = settled_metrics(server)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    received = []
    client.start_stream(callback=lambda result, error: received.append((result, error)))
    client.async_stream_infer("tidar", build_inputs("def main():\n", 2000, True, draft_len=1))
    assert wait_for(lambda: len(received) >= 3)
    client.stop_stream(cancel_requests=True)
    client.close()
    script = ("import sys; from tidar.serving.client import request\n"
              "request(sys.argv[1], 'import os\\n', 2000, on_text=lambda t: print(t, flush=True), draft_len=1)")
    child = subprocess.Popen([sys.executable, "-c", script, server.grpc_url], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline()  # streaming has begun
    child.kill()
    child.wait()
    cancelled = 'tidar_requests_total{outcome="cancelled"}'
    assert wait_for(lambda: metrics(server).get(cancelled, 0) - before.get(cancelled, 0) == 2), metrics(server)
    assert wait_for(lambda: metrics(server)["tidar_active_rows"] == 0)
    assert request(server.grpc_url, "import os\n", 12).token_ids == ar_oracle("import os\n", 12).token_ids


def test_metric_counters_agree_with_response_statistics(server):
    before = settled_metrics(server)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: request(server.grpc_url, p, 30, draft_len=4), PROMPTS[4:8]))
    after = settled_metrics(server)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta("vllm:spec_decode_num_draft_tokens_total") == sum(r.draft_tokens for r in results) > 0
    assert delta("vllm:spec_decode_num_accepted_tokens_total") == sum(r.accepted_draft_tokens for r in results)
    # b - 1 = 3 proposals per drafting step from TiDAR's block; an n-gram continuation (the default
    # hybrid drafter) may propose fewer
    assert 0 < delta("vllm:spec_decode_num_draft_tokens_total") <= delta("vllm:spec_decode_num_drafts_total") * 3
    assert delta("tidar_tokens_per_forward_sum") == 120
    assert delta('tidar_requests_total{outcome="length"}') == 4
    per_position = [delta(f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}') for i in range(3)]
    assert sum(per_position) == delta("vllm:spec_decode_num_accepted_tokens_total")
    assert per_position == sorted(per_position, reverse=True)  # position i+1 is accepted only after position i
    # one time to first token per request, one inter-token latency per later forward (each commits tokens)
    assert delta("vllm:time_to_first_token_seconds_count") == 4
    assert delta("vllm:inter_token_latency_seconds_count") == sum(r.forward_passes - 1 for r in results)
    assert delta("vllm:time_to_first_token_seconds_sum") > 0 and delta("vllm:inter_token_latency_seconds_sum") > 0


def refusal(url: str, inputs: list, model: str = "tidar") -> str:
    """The error message the server answers a streamed gRPC request with (Triton's stream
    response carries the message only, not the code)."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(model, inputs)
        result, error = answers.get(timeout=120)
    finally:
        client.stop_stream(cancel_requests=False)
        client.close()
    assert error is not None, f"the request was answered: {result.get_response()}"
    return error.message()


def generate_status(server, body: dict, model: str = "tidar") -> tuple[int, str]:
    """(HTTP status, error message) of Triton's generate endpoint for `body` (INVALID_ARG -> 400)."""
    call = urllib.request.Request(f"{server.http_url}/v2/models/{model}/generate", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=120) as reply:
            return reply.status, ""
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()).get("error", "")


def raw_input(name: str, array: np.ndarray, wire_type: str):
    tensor = grpcclient.InferInput(name, list(array.shape), wire_type)
    tensor.set_data_from_numpy(array)
    return tensor


BAD_GRPC_REQUESTS = [  # (max_tokens, optional inputs, fragment of the error message)
    (0, {}, "'max_tokens' must be in [1, 2048], got 0"),
    (-1, {}, "'max_tokens' must be in [1, 2048], got -1"),
    (2 ** 31 - 1, {}, "'max_tokens' must be in [1, 2048], got 2147483647"),
    (4, {"temperature": -0.5}, "'temperature' must be a finite number >= 0 (0 = greedy), got -0.5"),
    (4, {"temperature": float("nan")}, "'temperature' must be a finite number >= 0"),
    (4, {"top_p": 1.5}, "'top_p' must be <= 1 (<= 0 = unset), got 1.5"),
    (4, {"num_return_sequences": 0}, "'num_return_sequences' must be in [1, 16], got 0"),
    (4, {"num_return_sequences": 99}, "'num_return_sequences' must be in [1, 16], got 99"),
    (4, {"beam_width": 2}, "'beam_width' = 2 is not supported"),
    (4, {"mode": "fast"}, "'mode' must be one of tidar, ar, got 'fast'"),
    (4, {"draft_len": 99}, "draft_len"),
    (4, {"draft_len": 2, "mode": "ar"}, "'draft_len' = 2 contradicts mode 'ar'"),
    (4, {"end_id": -1}, "'end_id' must be a token id in [0, 4096), got -1"),
    (4, {"pad_id": 10 ** 6}, "'pad_id' must be a token id in [0, 4096), got 1000000"),
    (4, {"seed": 1, "random_seed": 2}, "'seed' = 1 and 'random_seed' = 2 disagree"),
    (4, {"timeout": -1.0}, "'timeout' must be positive seconds, got -1.0"),
    (4, {"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0, got 0.0"),
    (4, {"min_tokens": -3}, "min_tokens must be an integer >= 0, got -3"),
    (4, {"lora_task_id": 3}, "'lora_task_id' = 3 is not supported"),
    (4, {"input_ids": [1, 99999]}, "'input_ids' must hold token ids in [0, 4096), got 99999 at position 1"),
    (4, {"input_ids": []}, "'input_ids' is empty"),
    (4, {"image_url_input": "http://x/y.png"}, "'image_url_input' is not supported"),
]


def test_bad_requests_each_get_invalid_arg_naming_the_input_and_the_server_keeps_serving(server, ar_oracle):
    """Bad values of the contract's inputs (TiDAR's `input_ids` included), an empty or non-UTF-8
    prompt, a wrong type and a missing input, sent over gRPC as NVIDIA's clients send them: each
    an error naming the input (by the model, or by Triton for the type and the missing input).
    The same values through Triton's HTTP generate endpoint, which maps the error's code, get 400:
    the model's code is INVALID_ARG. Then a good request is answered."""
    for max_tokens, options, fragment in BAD_GRPC_REQUESTS:
        if any(isinstance(value, float) and value != value for value in options.values()):
            continue  # NaN has no JSON spelling
        status, message = generate_status(server, {"text_input": "def main():\n", "max_tokens": max_tokens,
                                                   **options})
        assert status == 400 and fragment in message, (options, status, message)
    cases = [(build_inputs("def main():\n", max_tokens, **options), fragment)
             for max_tokens, options, fragment in BAD_GRPC_REQUESTS]
    cases += [
        (build_inputs("", 4), "input 'text_input' is empty"),
        (build_inputs(b"\xff\xfe", 4), "input 'text_input' is not valid UTF-8"),
        ([raw_input("text_input", np.array([[b"x"]], dtype=np.object_), "BYTES"),
          raw_input("max_tokens", np.array([[4.0]], dtype=np.float32), "FP32")], "max_tokens"),
        ([raw_input("text_input", np.array([[b"x"]], dtype=np.object_), "BYTES")], "max_tokens"),
    ]
    assert len(cases) >= 20
    for inputs, fragment in cases:
        message = refusal(server.grpc_url, inputs)
        assert fragment in message, (fragment, message)
    assert request(server.grpc_url, "import os\n", 12).token_ids == ar_oracle("import os\n", 12).token_ids


def test_full_queue_is_overloaded_and_timeouts_end_requests(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    received = []
    client.start_stream(callback=lambda result, error: received.append((result, error)))
    client.async_stream_infer("tidar_small", build_inputs("def main():\n", 2000, True))  # takes the one row
    assert wait_for(lambda: len(received) >= 2)
    client.async_stream_infer("tidar_small", build_inputs("import os", 2000, True))  # waits in the queue
    time.sleep(0.5)
    with pytest.raises(ClientError, match=r"overloaded: 1 requests are queued \(max_queue_size = 1\)"):
        request(server.grpc_url, "x = 1", 4, model="tidar_small")
    client.stop_stream(cancel_requests=True)
    client.close()
    timed = request(server.grpc_url, "def main():\n", 2000, timeout=1.0, draft_len=1)
    assert timed.finish_reason == "timeout" and 0 < len(timed.token_ids) < 2000


def test_cli_client_prints_text_and_stats(server):
    run = subprocess.run([sys.executable, "-m", "tidar.cli", "client", "--url", server.grpc_url, "--max-tokens", "16",
                          "def main():"], capture_output=True, text=True, check=True)
    assert run.stdout and re.search(r"\[16 tokens in .* tokens/s, T/NFE .* finish: length\]", run.stderr)
    bad = subprocess.run([sys.executable, "-m", "tidar.cli", "client", "--url", server.grpc_url, "--max-tokens", "0",
                          "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "'max_tokens' must be in [1, 2048], got 0" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_tidar_serve_runs_until_sigterm_and_refuses_a_taken_port(server, tmp_path):
    """The CLI as a user runs it: endpoints printed when ready, SIGTERM stops the server cleanly
    (exit 0), and a taken port is a one-line error (exit 2)."""
    import signal

    repo = render_repository(tmp_path / "repo", model_dir=str(BUNDLED_MODEL), backend="torch", draft_len="0")
    taken = subprocess.run([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port",
                            str(server.grpc_port)], capture_output=True, text=True)
    assert taken.returncode == 2 and f"gRPC port {server.grpc_port} is already in use" in taken.stderr
    assert "Traceback" not in taken.stderr
    child = subprocess.Popen([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port", "0",
                              "--http-port", "0", "--metrics-port", "0"], stderr=subprocess.PIPE, text=True)
    lines = []
    while not any(line.startswith("ready:") for line in lines):
        line = child.stderr.readline()
        assert line, f"tidar serve ended before it was ready: {lines}"
        lines.append(line)
    url = re.search(r"gRPC (\S+)", lines[-1]).group(1)
    assert len(request(url, "import os\n", 8).token_ids) == 8
    child.send_signal(signal.SIGTERM)
    rest = child.stderr.read()
    assert child.wait(60) == 0 and "tritonserver stopped (status 0)" in rest


# ---------------------------------------------------------------- tensorrtllm_backend's clients
def published_request(prompt: str, max_tokens: int, **values):
    """A request as tensorrtllm_backend's end_to_end_grpc_client.py builds it: every tensor [1, 1]
    (lists [1, N]), numpy dtypes mapped with tritonclient's np_to_triton_dtype."""
    from tritonclient.utils import np_to_triton_dtype

    arrays = {"text_input": np.array([[prompt]]).astype(object), "max_tokens": np.array([[max_tokens]], np.int32)}
    for name, value in values.items():
        arrays[name] = np.array([value] if isinstance(value, list) else [[value]],
                                dtype=object if isinstance(value, (str, list)) else type(value))
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def stream_responses(server, model, inputs, outputs=()):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses = []
    client.start_stream(callback=lambda result, error: responses.append(error or result))
    client.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs] or None)
    client.stop_stream()  # waits until the server closes the stream
    client.close()
    errors = [r for r in responses if isinstance(r, Exception)]
    assert not errors, errors
    return responses


@pytest.mark.parametrize("model", ["ensemble", "tidar"])
def test_published_contract_streaming_and_not_with_and_without_the_prompt(server, ar_oracle, model):
    prompt = "def main():\n"
    expected = ar_oracle(prompt, 20).text
    temperature_only = dict(temperature=np.float32(1.0), beam_width=np.int32(1))  # greedy in TensorRT-LLM
    for exclude in (False, True):
        whole = stream_responses(server, model, published_request(
            prompt, 20, stream=False, exclude_input_in_output=exclude, **temperature_only))
        assert len(whole) == 1 and whole[0].as_numpy("text_output").shape == (1,)
        assert whole[0].as_numpy("text_output")[0].decode() == (expected if exclude else prompt + expected)
        pieces = stream_responses(server, model, published_request(
            prompt, 20, stream=True, exclude_input_in_output=exclude, **temperature_only))
        assert len(pieces) > 1  # streaming never repeats the prompt, as there
        assert "".join(r.as_numpy("text_output")[0].decode() for r in pieces) == expected


def test_published_contract_perf_metrics_and_several_sequences(server):
    prompt, outputs = "import os\n", ["text_output", "sequence_index", *PERF_METRIC_OUTPUTS]
    responses = stream_responses(server, "ensemble", published_request(
        prompt, 16, stream=True, return_perf_metrics=True, num_return_sequences=np.int32(2), seed=np.uint64(7),
        temperature=np.float32(0.9), top_p=np.float32(1.0), draft_len=np.int32(3), bad_words="", stop_words=""),
        outputs)
    texts = {0: "", 1: ""}
    for response in responses:
        texts[int(response.as_numpy("sequence_index")[0][0])] += response.as_numpy("text_output")[0].decode()
        times = [int(response.as_numpy(n)[0][0]) for n in ("arrival_time_ns", "first_scheduled_time_ns",
                                                            "first_token_time_ns", "last_token_time_ns")]
        assert times == sorted(times) and times[0] > 0
    last = responses[-1]
    total, accepted = (int(last.as_numpy(n)[0][0]) for n in ("total_draft_tokens", "total_accepted_draft_tokens"))
    assert total > 0 and last.as_numpy("acceptance_rate")[0][0] == pytest.approx(accepted / total)
    for index in (0, 1):  # sequence i is the seeded request with seed 7 + i, whatever else runs
        solo = request(server.grpc_url, prompt, 16, seed=7 + index, temperature=0.9, top_p=1.0, draft_len=3)
        assert texts[index] == solo.text


def test_penalties_min_tokens_bad_words_and_log_probs_are_served(server, ar_oracle):
    """The processors and log-prob inputs of the contract, sampled, through the ensemble
    (one response) and the tidar model (streamed): the tokens of the same request decoded in this
    process, the log probs within 1e-4 (another batch shape and draft length: fp32 round-off),
    cum_log_probs their running sum; out-of-range values are INVALID_ARG naming the input."""
    engine, tokenizer = ar_oracle.engine, ar_oracle.engine.tokenizer
    prompt = "import os\nimport sys\n"
    plain = ar_oracle(prompt, 24).token_ids
    words = [tokenizer.decode([plain[1]]), tokenizer.decode(plain[4:6])]
    sampling = SamplingParams(temperature=0.9, top_k=50, seed=3, repetition_penalty=1.3, presence_penalty=0.2,
                              frequency_penalty=0.1, min_tokens=8,
                              bad_words=[tokenizer.encode(w, add_special_tokens=False) for w in words])
    expected = engine.generate([Request(tokenizer.encode(prompt), 24, sampling, return_log_probs=True)])[0]
    values = dict(temperature=np.float32(0.9), top_k=np.int32(50), seed=np.uint64(3),
                  repetition_penalty=np.float32(1.3), presence_penalty=np.float32(0.2),
                  frequency_penalty=np.float32(0.1), min_tokens=np.int32(8), bad_words=words, return_log_probs=True)
    outputs = ["text_output", "output_ids", "cum_log_probs", "output_log_probs"]
    for model, stream in (("ensemble", False), ("tidar", True)):
        responses = stream_responses(server, model, published_request(prompt, 24, stream=stream, **values), outputs)
        ids = [int(t) for r in responses for t in r.as_numpy("output_ids").reshape(-1)]
        log_probs = [float(v) for r in responses for v in r.as_numpy("output_log_probs").reshape(-1)]
        assert all(r.as_numpy("cum_log_probs").shape == (1, 1) and r.as_numpy("output_log_probs").ndim == 3
                   for r in responses)
        assert ids == expected.token_ids, model
        assert log_probs == pytest.approx(expected.log_probs, abs=1e-4), model
        assert float(responses[-1].as_numpy("cum_log_probs")[0, 0]) == pytest.approx(sum(expected.log_probs), abs=1e-3)
    # INVALID_ARG is HTTP 400 on the generate endpoint (a gRPC stream error carries no status)
    body = b'{"text_input": "x", "max_tokens": 4, "repetition_penalty": 0.0}'
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/v2/models/ensemble/generate", data=body,
                                                      method="POST"), timeout=60)
    assert refused.value.code == 400
    assert "input repetition_penalty must be a finite number > 0, got 0.0" in refused.value.read().decode()


def test_quick_start_generate_request_against_ensemble(server, ar_oracle):
    """tensorrtllm_backend's README quick-start, byte for byte (HTTP generate extension)."""
    body = b'{"text_input": "What is machine learning?", "max_tokens": 20, "bad_words": "", "stop_words": ""}'
    with urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/v2/models/ensemble/generate",
                                                       data=body, method="POST"), timeout=60) as response:
        answer = json.loads(response.read())
    prompt = "What is machine learning?"
    assert answer["model_name"] == "ensemble"
    assert answer["text_output"] == prompt + ar_oracle(prompt, 20).text


def test_triton_refuses_a_batch_of_two(server):
    inputs = published_request("x", 4)
    for tensor in inputs:
        array = np.array([["x"], ["y"]], dtype=object) if tensor.name() == "text_input" else np.array([[4], [4]],
                                                                                                    np.int32)
        tensor.set_shape([2, 1])
        tensor.set_data_from_numpy(array)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    errors = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    client.async_stream_infer("ensemble", inputs)
    client.stop_stream()
    assert errors and "batch" in str(errors[0]).lower(), errors


def test_tidar_serve_runs_a_command_against_the_ready_server_and_exits_with_its_status(tmp_path):
    """`tidar serve REPO -- COMMAND` (the README's main job): COMMAND runs once the server is
    ready, with TIDAR_GRPC_URL set; the server stops cleanly after it; its status is the exit status."""
    repo = render_repository(tmp_path / "repo", model_dir=str(BUNDLED_MODEL), backend="torch", draft_len="0")
    script = ("import os, sys; from tidar.serving.client import request\n"
              "sys.exit(3 if len(request(os.environ['TIDAR_GRPC_URL'], 'import os\\n', 4).token_ids) == 4 else 1)")
    run = subprocess.run([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port", "0", "--http-port",
                          "0", "--metrics-port", "0", "--", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 3, run.stderr
    assert "tritonserver stopped (status 0)" in run.stderr and "fault" not in run.stderr

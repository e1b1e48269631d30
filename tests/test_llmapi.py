"""The `tensorrt_llm` model (TensorRT-LLM's LLM-API Triton contract, serving/llmapi.py) on the real
tritonserver, driven as NVIDIA's own clients drive it: the documented curl through Triton's HTTP
generate endpoint, and the gRPC streaming requests of TensorRT-LLM's
triton_backend/tools/inflight_batcher_llm/end_to_end_test.py --test-llmapi.

Oracle for greedy outputs: AR decoding of the same weights in this process (float32, as the
server), itself tested against transformers. One server for the module (draft length fixed: no
start-up autotune).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from functools import partial
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from tidar import BUNDLED_MODEL
from tidar.serving.repository import render_repository
from tidar.serving.wire import LLMAPI_MODEL, PERF_METRIC_LLMAPI_OUTPUTS

from serving_helpers import greedy_oracle, running_server

QUICK_START = '{"text_input": "The future of AI is", "sampling_param_max_tokens":10}'
"""tensorrtllm_backend docs/llmapi.md's request, with the max_tokens input as the template names it."""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = render_repository(tmp_path_factory.mktemp("llmapi") / "repo", model_dir=str(BUNDLED_MODEL),
                             backend="torch", dtype="float32", attention="eager", threads=1, draft_len="16")
    with running_server(repo) as running:
        yield running


@pytest.fixture(scope="module")
def greedy():
    return greedy_oracle()


def generate(server, body: str, model: str = LLMAPI_MODEL) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"{server.http_url}/v2/models/{model}/generate", data=body.encode(),
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_quick_start_curl_with_and_without_perf_metrics(server, greedy):
    status, answer = generate(server, QUICK_START)
    assert status == 200, answer
    expected = greedy("The future of AI is", 10)
    assert answer["text_output"] == "The future of AI is" + expected.text  # the prompt first, as model.py
    assert not set(PERF_METRIC_LLMAPI_OUTPUTS) & set(answer)

    body = json.loads(QUICK_START) | {"sampling_param_return_perf_metrics": True, "return_finish_reason": True}
    status, metrics = generate(server, json.dumps(body))
    assert status == 200, metrics
    assert metrics["text_output"] == answer["text_output"] and metrics["finish_reason"] == "length"
    assert set(PERF_METRIC_LLMAPI_OUTPUTS) <= set(metrics)
    assert 0 < metrics["total_accepted_draft_tokens"] <= metrics["total_draft_tokens"]
    assert metrics["acceptance_rate"] == pytest.approx(metrics["total_accepted_draft_tokens"]
                                                       / metrics["total_draft_tokens"])
    prompt_tokens = len(expected.prompt_ids)
    assert metrics["kv_cache_alloc_new_blocks"] == metrics["kv_cache_alloc_total_blocks"] == prompt_tokens + 10
    assert metrics["kv_cache_missed_block"] == prompt_tokens + 10 and metrics["kv_cache_reused_block"] == 0
    assert metrics["kv_cache_hit_rate"] == 0
    times = [metrics[f"{name}_time_ns"] for name in ("arrival", "first_scheduled", "first_token", "last_token")]
    assert times == sorted(times) and times[0] > 0


def _tensor(name, array):
    """end_to_end_test.py's utils.prepare_tensor for gRPC (triton_backend/tools/utils/utils.py)."""
    tensor = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def _stream(server, inputs, outputs) -> list:
    """end_to_end_test.py's async_stream_infer: start_stream, async_stream_infer with a request id,
    stop_stream (which waits for the stream to end); every result and error, in order."""
    results = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=partial(lambda sink, result, error: sink.put((result, error)), results))
    client.async_stream_infer(LLMAPI_MODEL, inputs, outputs=outputs, request_id="0")
    client.stop_stream()
    client.close()
    return [results.get() for _ in range(results.qsize())]


def test_end_to_end_test_llmapi_streaming_requests(server, greedy):
    """The requests of end_to_end_test.py --test-llmapi --streaming -i grpc (TensorRT-LLM
    triton_backend/tools/inflight_batcher_llm/end_to_end_test.py: test_functionality_llmapi sends
    text_input [prompt] and streaming [True], plus the --output-config flags, and asks for
    text_output, finish_reason, stop_reason; test_performance's create_inputs sends text_input and
    sampling_param_max_tokens int32 [n]). Each result must carry non-empty text, as it asserts."""
    prompt = "def main():\n"
    inputs = [_tensor("text_input", np.array([prompt], dtype=object)),
              _tensor("streaming", np.array([True], dtype=bool)),
              _tensor("return_finish_reason", np.array([True], dtype=bool)),
              _tensor("return_stop_reason", np.array([True], dtype=bool))]
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("text_output", "finish_reason", "stop_reason")]
    results = _stream(server, inputs, outputs)
    assert results and all(error is None for _, error in results), results
    texts = [result.as_numpy("text_output")[0].decode("utf-8") for result, _ in results]
    assert all(texts) and texts == sorted(texts, key=len)  # cumulative, as the LLM API's output.text
    assert texts[-1] == greedy(prompt, 32).text  # 32: SamplingParams' max_tokens default
    reasons = [result.as_numpy("finish_reason")[0].decode() for result, _ in results]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {"None"}
    assert results[-1][0].as_numpy("stop_reason")[0] == b"None"

    performance = [_tensor("text_input", np.array([prompt], dtype=object)),
                   _tensor("sampling_param_max_tokens", np.array([7], dtype=np.int32)),
                   _tensor("streaming", np.array([True], dtype=bool))]
    results = _stream(server, performance, [grpcclient.InferRequestedOutput("text_output")])
    assert results[-1][0].as_numpy("text_output")[0].decode() == greedy(prompt, 7).text


def test_seed_stop_string_and_excluded_input(server, greedy):
    sampled = {"text_input": "import os\n", "sampling_param_max_tokens": 16, "sampling_param_temperature": 0.9,
               "sampling_param_top_k": 50, "sampling_param_seed": 7,
               "sampling_param_exclude_input_from_output": True}
    first, second = (generate(server, json.dumps(sampled)) for _ in range(2))
    assert first[0] == second[0] == 200 and first[1]["text_output"] == second[1]["text_output"]
    assert generate(server, json.dumps(sampled | {"sampling_param_seed": 8}))[1]["text_output"] != \
        first[1]["text_output"]  # the seed matters (sampling, not greedy)

    prompt = "def main():\n"
    whole = greedy(prompt, 40).text
    assert "\n" in whole  # precondition: the greedy continuation reaches a line end
    status, stopped = generate(server, json.dumps({
        "text_input": prompt, "sampling_param_max_tokens": 40, "sampling_param_stop": ["\n"],
        "sampling_param_exclude_input_from_output": True, "return_finish_reason": True,
        "return_stop_reason": True}))
    assert status == 200, stopped
    assert stopped["text_output"] == whole[:whole.index("\n")]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == "\n"
    status, included = generate(server, json.dumps({"text_input": prompt, "sampling_param_max_tokens": 5}))
    assert included["text_output"] == prompt + greedy(prompt, 5).text


BAD_REQUESTS = [
    ({"sampling_param_best_of": 2}, "sampling_param_best_of"),
    ({"sampling_param_best_of": 0}, "sampling_param_best_of"),
    ({"image_url": ["https://example.com/a.png"]}, "image_url"),
    ({"lora_id": 1}, "lora_id"),
    ({"lora_name": "adapter"}, "lora_name"),
    ({"lora_path": "/adapters/a"}, "lora_path"),
    ({"lora_ckpt_source": "hf"}, "lora_ckpt_source"),
    ({"stop": True}, "stop"),
    ({"sampling_param_temperature": -1.0}, "sampling_param_temperature"),
    ({"sampling_param_top_p": 2.0}, "sampling_param_top_p"),
    ({"sampling_param_top_k": -1}, "sampling_param_top_k"),
    ({"sampling_param_max_tokens": 0}, "sampling_param_max_tokens"),
    ({"sampling_param_max_tokens": 2 ** 20}, "sampling_param_max_tokens"),
    ({"text_input": ""}, "text_input"),
    ({"text_input": ["a", "b"]}, "text_input"),
    ({"max_tokens": 4}, "sampling_param_max_tokens"),  # the generate endpoint makes it a parameter: refused
    ({"temperature": 0.5}, "sampling_param_temperature"),  # the hint names the input meant
    ({"stream": True}, "stream"),
    ({"sampling_param_temperature": [0.5, 0.7]}, "sampling_param_temperature"),
    ({"exclude_input_in_output": True}, "exclude_input_in_output"),
]
"""(A JSON value of the wrong type, e.g. a string seed, is refused by Triton's HTTP front before the
model sees it: status 500, "Unable to parse 'data'", no input named; not counted here.)"""


def test_twenty_bad_requests_get_errors_naming_the_input_and_the_server_keeps_serving(server, greedy):
    for fields, name in BAD_REQUESTS:
        status, answer = generate(server, json.dumps({"text_input": "x = 1", **fields}))
        assert status == 400, (fields, answer)
        assert name in answer, (fields, answer)
    status, answer = generate(server, QUICK_START)
    assert status == 200 and answer["text_output"] == "The future of AI is" + greedy("The future of AI is", 10).text

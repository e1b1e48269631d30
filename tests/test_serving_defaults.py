"""generation_config.json's sampling defaults through the real tritonserver, on every front: the
OpenAI front, the `tidar` contract (gRPC) and the `tensorrt_llm` contract (Triton's HTTP generate
endpoint, as its documented curl sends it), serving the released-layout checkpoint of
tests/released_checkpoint.py (temperature 0.6, top_k 20, top_p 0.95, an eos list).

Oracle: the same weights decoded in this process (float32, draft length 16 as the server): a
request that leaves the sampling parameters unset must give the tokens of SamplingParams(0.6,
top_k 20, top_p 0.95) with its seed; temperature 0 must stay greedy; a parameter the request sets
wins over the checkpoint's (top_k 1: greedy).
"""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.generation_config import GenerationDefaults
from tidar.runtime.sampling import SamplingParams
from tidar.runtime.tokenizer import Tokenizer
from tidar.serving.client import request
from tidar.serving.openai_front import OpenAIFront
from tidar.serving.repository import render_repository
from tidar.serving.serve import TritonServer

from released_checkpoint import write_released_checkpoint

PROMPT = "def main():\n    return"
TOKENS = 24
SEED = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    checkpoint = write_released_checkpoint(root / "released")
    repo = render_repository(root / "repo", model_dir=str(checkpoint), backend="torch", dtype="float32",
                             attention="eager", threads=1, draft_len="16", max_batch_size=4)
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0).start()
    try:
        with OpenAIFront(server.grpc_url, checkpoint, port=0) as front:
            yield server, front, checkpoint
    finally:
        status = server.stop()
    assert status == 0, f"tritonserver did not stop cleanly (status {status}); its log: {server.log_file}"


def generate_here(checkpoint, sampling: SamplingParams):
    engine = DecodeEngine(TorchBackend.load(checkpoint, dtype="float32"), Tokenizer(checkpoint), draft_len=16)
    eos = GenerationDefaults.from_folder(checkpoint).eos_ids
    return engine.generate([Request(engine.tokenizer.encode(PROMPT), TOKENS, sampling, eos_ids=eos)])[0]


def llmapi_generate(server, **fields) -> str:
    body = json.dumps({"text_input": PROMPT, "sampling_param_max_tokens": TOKENS,
                       "sampling_param_exclude_input_from_output": True, **fields}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{server.http_url}/v2/models/tensorrt_llm/generate", body,
                                                       {"Content-Type": "application/json"}), timeout=120) as reply:
        return json.loads(reply.read())["text_output"]


def test_unset_sampling_parameters_take_the_checkpoints_defaults_on_every_front(served):
    server, front, checkpoint = served
    defaults = GenerationDefaults.from_folder(checkpoint)
    assert dict(defaults.sampling) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    sampled = generate_here(checkpoint, SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=SEED))
    greedy = generate_here(checkpoint, SamplingParams())
    assert sampled.token_ids != greedy.token_ids  # the defaults change this output: the test can tell them apart

    client = openai.OpenAI(base_url=front.url, api_key="none", max_retries=0)
    complete = lambda **options: client.completions.create(  # noqa: E731
        model=front.served_name, prompt=PROMPT, max_tokens=TOKENS, **options).choices[0].text
    assert complete(seed=SEED) == sampled.text
    assert complete(seed=SEED, temperature=0.6, top_p=0.95, extra_body={"top_k": 20}) == sampled.text
    assert complete(seed=SEED, temperature=0) == greedy.text
    assert complete(seed=SEED, extra_body={"top_k": 1}) == greedy.text  # set by the request: wins

    assert request(server.grpc_url, PROMPT, TOKENS, seed=SEED).token_ids == sampled.token_ids
    assert request(server.grpc_url, PROMPT, TOKENS, seed=SEED, temperature=0.0).token_ids == greedy.token_ids

    assert llmapi_generate(server, sampling_param_seed=SEED) == sampled.text
    assert llmapi_generate(server, sampling_param_seed=SEED, sampling_param_temperature=0.0) == greedy.text

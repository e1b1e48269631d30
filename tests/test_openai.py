"""The OpenAI-compatible front (openai_front.py) on the real tritonserver, driven with the official
`openai` Python client, and with raw HTTP for what that client cannot send.

Oracles: greedy outputs are AR decoding of the same weights in this process (float32, as the
server), on the same token ids; chat prompts are rendered by `transformers`' apply_chat_template
from the same tokenizer_config.json; a seeded sampled completion equals the same request sent to
the Triton model directly. The fronts share one server: one reads a copy of the bundled checkpoint
with a chat template added, another the bundled checkpoint itself, which has none, and a third
(the copy, bound to 127.0.0.1) needs an API key.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
from transformers import AutoTokenizer

from tidar import BUNDLED_MODEL
from tidar.serving.client import request
from tidar.serving.repository import render_repository
from tidar.serving.openai_front import OpenAIFront, served_name_of
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.sampling import SamplingParams
from tidar.runtime.tokenizer import Tokenizer

from serving_helpers import metrics, running_server, settled_metrics, wait_for

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    chat_model = shutil.copytree(BUNDLED_MODEL, root / "chat-model")
    config = json.loads((chat_model / "tokenizer_config.json").read_text())
    (chat_model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    repo = render_repository(root / "repo", model_dir=str(BUNDLED_MODEL), backend="torch", dtype="float32",
                             attention="eager", threads=1, draft_len="2", max_batch_size=16)
    # the front cancels only unfinished requests, so the server stops cleanly (running_server checks it)
    with running_server(repo) as server, OpenAIFront(server.grpc_url, chat_model, port=0) as chat, \
            OpenAIFront(server.grpc_url, BUNDLED_MODEL, port=0) as plain:
        yield server, chat, plain, chat_model


@pytest.fixture(scope="module")
def greedy():
    engine = DecodeEngine(TorchBackend.load(BUNDLED_MODEL, dtype="float32"), Tokenizer(BUNDLED_MODEL), draft_len=0)

    def run(text: str, max_tokens: int):
        return engine.generate([Request(engine.tokenizer.encode(text), max_tokens)])[0]

    run.engine = engine
    return run


def client_of(front) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.url, api_key="none", max_retries=0)


def test_models_and_completions_streaming_and_not(setup, greedy):
    server, chat, _, _ = setup
    client = client_of(chat)
    assert [m.id for m in client.models.list().data] == [chat.served_name]
    prompt = "def main():\n"
    expected = greedy(prompt, 24)
    whole = client.completions.create(model=chat.served_name, prompt=prompt, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected.text and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(expected.prompt_ids), 24)
    chunks = list(client.completions.create(model=chat.served_name, prompt=prompt, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 24 and [c.choices[0].finish_reason for c in chunks
                                                         if c.choices][-1] == "length"
    echoed = client.completions.create(prompt=prompt, max_tokens=5, temperature=0, echo=True, model=chat.served_name)
    assert echoed.choices[0].text == prompt + greedy(prompt, 5).text


def test_stop_and_seed(setup, greedy):
    server, chat, _, _ = setup
    client = client_of(chat)
    prompt = "if __name__ == '__main__':\n"
    full = greedy(prompt, 40).text
    assert any(s in full[1:] for s in ("\n\n", ":"))  # the bundled model reaches a stop string, not at once
    stopped = client.completions.create(model=chat.served_name, prompt=prompt, max_tokens=40, temperature=0,
                                        stop=["\n\n", ":"])
    cut = min((full.index(s) for s in ("\n\n", ":") if s in full), default=len(full))
    assert stopped.choices[0].text == full[:cut] and stopped.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=chat.served_name, prompt=prompt, max_tokens=16, temperature=0.9,
                                         top_p=0.95, seed=11).choices[0].text for _ in range(2)]
    direct = request(server.grpc_url, prompt, 16, temperature=0.9, top_p=0.95, seed=11).text
    assert sampled == [direct, direct]


def test_chat_uses_the_checkpoints_template_and_refuses_without_one(setup, greedy):
    _, chat, plain, chat_model = setup
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    prompt = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    expected = greedy(prompt, 20).text
    client = client_of(chat)
    answer = client.chat.completions.create(model=chat.served_name, messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(Tokenizer(BUNDLED_MODEL).encode(prompt))
    streamed = client.chat.completions.create(model=chat.served_name, messages=messages, max_completion_tokens=20,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        client_of(plain).chat.completions.create(model=plain.served_name, messages=messages, max_tokens=4)


def test_penalties_and_log_probs(setup, greedy):
    """presence / frequency penalties and the sampled tokens' log probs (completions `logprobs` = 0,
    chat `logprobs` true, streamed and not): the text and log probs of the same request decoded
    in this process (log probs within 1e-4: another batch shape, fp32 round-off)."""
    _, chat, _, chat_model = setup
    client, engine = client_of(chat), greedy.engine
    prompt = "import os\nimport sys\n"
    sampling = SamplingParams(temperature=0.9, seed=11, presence_penalty=0.5, frequency_penalty=0.3)
    expected = engine.generate([Request(engine.tokenizer.encode(prompt), 16, sampling, return_log_probs=True)])[0]
    options = dict(model=chat.served_name, max_tokens=16, temperature=0.9, seed=11, presence_penalty=0.5,
                   frequency_penalty=0.3)
    whole = client.completions.create(prompt=prompt, logprobs=0, **options).choices[0]
    assert whole.text == expected.text
    assert whole.logprobs.token_logprobs == pytest.approx(expected.log_probs, abs=1e-4)
    assert "".join(whole.logprobs.tokens) == expected.text and whole.logprobs.text_offset[0] == 0
    streamed = [c.choices[0].logprobs for c in client.completions.create(prompt=prompt, logprobs=0, stream=True,
                                                                        **options) if c.choices]
    assert [v for piece in streamed if piece for v in piece.token_logprobs] == whole.logprobs.token_logprobs
    assert [o for piece in streamed if piece for o in piece.text_offset] == whole.logprobs.text_offset
    messages = [{"role": "user", "content": "A loop, please."}]
    rendered = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    expected = engine.generate([Request(engine.tokenizer.encode(rendered), 16, sampling, return_log_probs=True)])[0]
    answer = client.chat.completions.create(messages=messages, logprobs=True, **options).choices[0]
    assert answer.message.content == expected.text
    assert [t.logprob for t in answer.logprobs.content] == pytest.approx(expected.log_probs, abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **options)


@pytest.mark.parametrize("options,error,param", [
    (dict(temperature=3.0), openai.BadRequestError, "temperature"),
    (dict(presence_penalty=2.5), openai.BadRequestError, "presence_penalty"),
    (dict(frequency_penalty="high"), openai.BadRequestError, "frequency_penalty"),
    (dict(logprobs=2), openai.BadRequestError, "logprobs"),
    (dict(logprobs=0, echo=True), openai.BadRequestError, "logprobs"),
    (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
    (dict(n=20), openai.BadRequestError, "n"),
    (dict(model="gpt-4"), openai.NotFoundError, "model"),
    (dict(max_tokens=5000), openai.BadRequestError, "max_tokens"),  # refused by the Triton model, which names it
])
def test_bad_requests_get_openai_errors(setup, options, error, param):
    _, chat, _, _ = setup
    body = {"model": chat.served_name, "prompt": "x = 1", "max_tokens": 4, **options}
    with pytest.raises(error) as caught:
        client_of(chat).completions.create(**body)
    detail = caught.value.body
    assert set(detail) >= {"message", "type", "param"} and detail["param"] == param
    if options.get("max_tokens") == 5000:
        assert "'max_tokens' must be in [1, 2048], got 5000" in detail["message"]


API_KEY = "sk-tidar-test"


@pytest.fixture(scope="module")
def keyed(setup):
    server, _, _, chat_model = setup
    with OpenAIFront(server.grpc_url, chat_model, port=0, host="127.0.0.1", api_key=API_KEY) as front:
        yield front


def http(front, method: str, route: str, body=None, key: str | None = API_KEY, raw: bytes | None = None,
         scheme: str = "Bearer"):
    """(status, parsed JSON body or None) of one raw HTTP request to the front."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"{scheme} {key}"
    url = front.url.removesuffix("/v1") + route
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=120) as reply:
            status, text = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    return status, json.loads(text) if text.strip().startswith(b"{") else None


def test_prompts_as_token_ids_and_lists(setup, greedy):
    """OpenAI's four prompt forms. Token ids reach the model as they are: a split the tokenizer
    would never make gives AR decoding of exactly those ids. A list of prompts with n = 2 answers
    choices[i * n + j] for prompt i, streamed or not, and the usage sums the prompts."""
    _, chat, _, _ = setup
    client, engine = client_of(chat), greedy.engine
    tokenizer = engine.tokenizer
    prompts = ["def main():\n", "import os\n"]
    ids = tokenizer.encode(prompts[0])
    by_id = client.completions.create(model=chat.served_name, prompt=ids, max_tokens=12, temperature=0)
    assert by_id.choices[0].text == greedy(prompts[0], 12).text and by_id.usage.prompt_tokens == len(ids)
    split = [token for char in "def main" for token in tokenizer.encode(char)]  # one token per character
    assert split != tokenizer.encode("def main")
    expected = engine.generate([Request(split, 10)])[0]
    answer = client.completions.create(model=chat.served_name, prompt=split, max_tokens=10, temperature=0, echo=True)
    assert answer.choices[0].text == "def main" + expected.text and answer.usage.prompt_tokens == len(split)

    oracles = [greedy(p, 8).text for p in prompts]
    for form in (prompts, [tokenizer.encode(p) for p in prompts]):
        listed = client.completions.create(model=chat.served_name, prompt=form, max_tokens=8, temperature=0, n=2)
        assert [c.index for c in listed.choices] == [0, 1, 2, 3]
        assert [c.text for c in listed.choices] == [oracles[0], oracles[0], oracles[1], oracles[1]]
        assert listed.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
        assert listed.usage.completion_tokens == 4 * 8
    chunks = list(client.completions.create(model=chat.served_name, prompt=prompts, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        texts[chunk.choices[0].index] = texts.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert texts == {0: oracles[0], 1: oracles[1]}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.total_tokens == 16 + sum(len(tokenizer.encode(p)) for p in prompts)
    plain = list(client.completions.create(model=chat.served_name, prompt=prompts[1], max_tokens=4, temperature=0,
                                           stream=True))
    assert all(chunk.usage is None and chunk.choices for chunk in plain)  # no usage chunk unless asked


def test_api_key_guards_every_v1_route(keyed, greedy):
    """As vLLM: with a key, /v1/models and the generation routes need `Authorization: Bearer KEY`
    (401 otherwise, OpenAI's error body); /health stays open; the front binds the address given."""
    assert keyed.url.startswith("http://127.0.0.1:")
    good = openai.OpenAI(base_url=keyed.url, api_key=API_KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [keyed.served_name]
    done = good.completions.create(model=keyed.served_name, prompt="import os\n", max_tokens=6, temperature=0)
    assert done.choices[0].text == greedy("import os\n", 6).text
    wrong = openai.OpenAI(base_url=keyed.url, api_key="sk-wrong", max_retries=0)
    for call in (wrong.models.list, lambda: wrong.completions.create(model=keyed.served_name, prompt="x",
                                                                      max_tokens=2),
                 lambda: wrong.chat.completions.create(model=keyed.served_name, max_tokens=2,
                                                       messages=[{"role": "user", "content": "x"}])):
        with pytest.raises(openai.AuthenticationError) as caught:
            call()
        assert caught.value.status_code == 401 and "'Authorization'" in caught.value.body["message"]
    assert http(keyed, "GET", "/health", key=None) == (200, None)


BAD_REQUESTS = [  # (route, body, changes to the request, status, param, fragment of the message)
    ("/v1/models", None, {"key": None}, 401, None, "Authorization: Bearer"),
    ("/v1/completions", {"prompt": "x"}, {"key": None}, 401, None, "Authorization: Bearer"),
    ("/v1/completions", {"prompt": "x"}, {"key": "sk-wrong"}, 401, None, "incorrect API key"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, {"scheme": "Basic"}, 401, None,
     "Authorization: Bearer"),
    ("/v1/completions", None, {"raw": b"{not json"}, 400, None, "not valid JSON"),
    ("/v1/completions", {"prompt": []}, {}, 400, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": [[]]}, {}, 400, "prompt", "'prompt[0]' is an empty token list"),
    ("/v1/completions", {"prompt": [1, -5]}, {}, 400, "prompt", "'prompt[1]' must be a token id in [0, 4096), got -5"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 10 ** 9]]}, {}, 400, "prompt", "got 1000000000"),
    ("/v1/completions", {"prompt": ["ok", 7]}, {}, 400, "prompt", "'prompt[1]' must be a string or a list of token"),
    ("/v1/completions", {"prompt": ""}, {}, 400, "prompt", "'prompt' is empty"),
    ("/v1/completions", {"prompt": {"text": "x"}}, {}, 400, "prompt", "'prompt' must be a string"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, {}, 400,
     "stream_options.include_usage", "must be a boolean, got 'yes'"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, {}, 400, "stream_options",
     "only be given with 'stream': true"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2 ** 31}, {}, 400, "max_tokens", "got 2147483648"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, {}, 400, "max_tokens", "must be an integer, got '10'"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, {}, 400, "temperature", "got -1"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, {}, 400, "top_p", "got 1.5"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, {}, 400, "top_k", "got -2"),
    ("/v1/completions", {"prompt": "x", "n": 0}, {}, 400, "n", "got 0"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop", "at most 4"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, {}, 400, "echo", "must be a boolean"),
    ("/v1/completions", {"prompt": "x", "stream": 1}, {}, 400, "stream", "must be a boolean, got 1"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, {}, 400, "logit_bias", "not supported"),
    ("/v1/chat/completions", {"messages": []}, {}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, {}, 400, "messages", "'messages[0].role'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 42}]}, {}, 400, "messages",
     "'messages[0].content' must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {}, 400,
     "messages", "'messages[0].content[0]' must be a text part"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2 ** 31},
     {}, 400, "max_completion_tokens", "got 2147483648"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": "true"}, {}, 400,
     "logprobs", "must be a boolean"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]}, {}, 400,
     "chat_template_kwargs", "must be an object"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, {}, 404, "model", "'gpt-4' does not exist"),
]


def test_bad_requests_each_get_a_clean_error_and_the_front_keeps_serving(keyed, greedy):
    """Every malformed request (the API key, OpenAI's four prompt forms, stream_options, int32
    overflow, the chat messages, ...) gets OpenAI's error body with the status, the parameter and
    the value it names; afterwards the same front answers a good request."""
    assert len(BAD_REQUESTS) >= 20
    for route, body, change, status, param, fragment in BAD_REQUESTS:
        if body is not None:
            body = {"max_tokens": 4, **body}
        got, reply = http(keyed, "GET" if body is None and "raw" not in change else "POST", route, body, **change)
        assert got == status, (route, body, change, reply)
        error = reply["error"]
        assert (error["param"], set(error)) == (param, {"message", "type", "param", "code"}), (body, error)
        assert fragment in error["message"], (body, error)
    status, reply = http(keyed, "POST", "/v1/completions", {"prompt": "import os\n", "max_tokens": 6,
                                                            "temperature": 0})
    assert status == 200 and reply["choices"][0]["text"] == greedy("import os\n", 6).text


def test_thirty_two_concurrent_streams_some_disconnecting(setup, greedy):
    """32 streaming clients at once; 8 go away after their first chunks. The others get their greedy
    outputs, the server keeps serving, and no row leaks (tidar_active_rows returns to 0)."""
    server, chat, _, _ = setup
    before = settled_metrics(server)
    prompts = [f"def f{i}(x):\n" for i in range(32)]
    quitters = set(range(0, 32, 4))

    async def one(client, index):
        tokens = 600 if index in quitters else 20
        stream = await client.completions.create(model=chat.served_name, prompt=prompts[index], max_tokens=tokens,
                                                 temperature=0, stream=True)
        text, seen = "", 0
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
            seen += 1
            if index in quitters and seen == 3:
                await stream.close()  # the client disconnects mid-stream
                return None
        return text

    async def run_all():
        client = openai.AsyncOpenAI(base_url=chat.url, api_key="none", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    texts = asyncio.run(run_all())
    for index, text in enumerate(texts):
        if index not in quitters:
            assert text == greedy(prompts[index], 20).text, index
    cancelled = 'tidar_requests_total{outcome="cancelled"}'
    assert wait_for(lambda: metrics(server).get(cancelled, 0) - before.get(cancelled, 0) == len(quitters), 60), \
        metrics(server)
    assert wait_for(lambda: metrics(server)["tidar_active_rows"] == 0, 60)
    after = client_of(chat).completions.create(model=chat.served_name, prompt="import os\n", max_tokens=8,
                                               temperature=0)
    assert after.choices[0].text == greedy("import os\n", 8).text


def test_tidar_serve_openai_port_runs_the_front(setup, tmp_path):
    """`tidar serve --openai-port 0` prints the front's URL and a command after `--` sees it."""
    repo = render_repository(tmp_path / "repo", model_dir=str(BUNDLED_MODEL), backend="torch", draft_len="0",
                             dtype="float32", threads=1)
    script = ("import os, openai; c = openai.OpenAI(api_key='none'); m = c.models.list().data[0].id; "
              "print(c.completions.create(model=m, prompt='import os', max_tokens=4, temperature=0).usage"
              ".completion_tokens)")
    run = subprocess.run([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port", "0", "--http-port",
                          "0", "--metrics-port", "0", "--openai-port", "0", "--", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "4" and "OpenAI http://localhost:" in run.stderr


def test_served_name_is_the_exported_checkpoints(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs": {"checkpoint": "/x/models/tidar-stdlib-qwen2"}}))
    assert served_name_of(tmp_path) == "tidar-stdlib-qwen2"
    assert served_name_of(BUNDLED_MODEL) == "tidar-stdlib-qwen2"

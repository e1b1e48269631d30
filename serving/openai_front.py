"""OpenAI-compatible HTTP front of a served TiDAR model (`tidar serve REPO --openai-port P`).

    with OpenAIFront(grpc_url="localhost:8001", model_dir=CHECKPOINT, port=0) as front:
        ...  # front.url -> "http://localhost:PORT/v1"

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (OpenAI's request
and response bodies; `stream: true` answers with server-sent events ending in `data: [DONE]`;
`stream_options.include_usage` adds a usage chunk). Every request is forwarded to the Triton
model over gRPC (tritonclient's asyncio client, one stream per request), so Triton's model and
its scheduler stay the one place that batches; a client that disconnects cancels its gRPC
stream, and the model frees the row at its next step.

Parameters: `max_tokens` (chat: also `max_completion_tokens`), `temperature` (0 = greedy),
`top_p`, `seed`, `stop`, `n`, `stream`, `echo` (completions), `presence_penalty` and
`frequency_penalty` (in [-2, 2]; forwarded to the model's inputs of the same names, so they
count the prompt's tokens too, as TensorRT-LLM does: docs/design.md §3.7), the sampled tokens'
log probs (completions: `logprobs` = 0; chat: `logprobs` true with no `top_logprobs`; the
model's `return_log_probs`, so a greedy token's is 0 as there); alternatives (`logprobs` > 0,
`top_logprobs` > 0), `echo` with `logprobs`, `logit_bias`, `best_of` > n, `tools` and a
`response_format` other than text are refused with a 400 naming the parameter. Chat prompts are
rendered with the chat template of the checkpoint's tokenizer_config.json (Jinja, sandboxed, as
transformers renders it); a checkpoint without one gets a 400. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

from aiohttp import web

from tidar.serving.wire import INPUT_SPECS, request_arrays

FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length"}
REFUSED = {"logit_bias": None, "tools": None, "functions": None, "suffix": None}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                            "code": None}}, status=self.status)


def load_chat_template(model_dir: Path) -> tuple[str | None, dict]:
    """(chat template or None, special tokens) from the checkpoint's tokenizer_config.json."""
    path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    tokens = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        tokens[name] = value.get("content") if isinstance(value, dict) else value
    return template, tokens


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.special_tokens = special_tokens
        self.errors = TemplateError

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except self.errors as error:
            raise APIError(400, f"the chat template refused the messages: {error}", "messages") from None


def _number(body: dict, name: str, kind, low=None, high=None, default=None):
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"'{name}' must be in [{low}, {high}], got {value!r}", name)
    return kind(value)


def sampling_inputs(body: dict) -> dict:
    """The Triton inputs of OpenAI's sampling parameters (temperature 1 and top_p 1 by default:
    sampling; temperature 0: greedy). Refuses what the model cannot honour, by name."""
    for name, neutral in REFUSED.items():
        if body.get(name, neutral) not in (neutral, None, False, [], {}):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise APIError(400, "'best_of' is not supported by this server", "best_of")
    format_ = body.get("response_format")
    if format_ not in (None, {"type": "text"}):
        raise APIError(400, "'response_format' other than text is not supported by this server", "response_format")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
                             or len(stop) > 4):
        raise APIError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    seed = _number(body, "seed", int)
    return {"temperature": _number(body, "temperature", float, 0, 2, default=1.0),
            "presence_penalty": _number(body, "presence_penalty", float, -2, 2),
            "frequency_penalty": _number(body, "frequency_penalty", float, -2, 2),
            "top_p": _number(body, "top_p", float, 0, 1, default=1.0),  # 0: greedy, as in the contract
            "seed": None if seed is None else seed % 2 ** 64,
            "stop_words": [s for s in stop or [] if s] or None,
            "num_return_sequences": _number(body, "n", int, 1, 16, default=1)}


def wants_log_probs(body: dict, chat: bool, echo: bool) -> bool:
    """Whether the sampled tokens' log probs are asked for (no alternatives: the model returns
    only the chosen token's)."""
    if chat:
        if body.get("top_logprobs") not in (None, 0):
            raise APIError(400, "'top_logprobs' is not supported by this server (no alternatives)", "top_logprobs")
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise APIError(400, f"'logprobs' must be a boolean, got {wanted!r}", "logprobs")
        return bool(wanted)
    if body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' is a chat parameter; completions use 'logprobs'", "top_logprobs")
    wanted = _number(body, "logprobs", int, 0, 5)
    if wanted:
        raise APIError(400, "'logprobs' > 0 is not supported by this server (no alternatives): send 0", "logprobs")
    if wanted is not None and echo:
        raise APIError(400, "'logprobs' with 'echo' is not supported by this server", "logprobs")
    return wanted is not None


class OpenAIFront:
    """The HTTP front (aiohttp) on its own thread and event loop; `start()` returns once it listens."""

    def __init__(self, grpc_url: str, model_dir: str | Path, port: int = 8080, host: str = "0.0.0.0",
                 triton_model: str = "tidar", served_name: str | None = None):
        from tidar.runtime.tokenizer import Tokenizer

        self.grpc_url, self.host, self.port = grpc_url, host, port
        self.triton_model = triton_model
        self.model_dir = Path(model_dir)
        self.served_name = served_name or served_name_of(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        template, tokens = load_chat_template(self.model_dir)
        self.chat_template = ChatTemplate(template, tokens) if template else None
        self.created = int(time.time())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tidar-openai", daemon=True)
        self._runner = None

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}/v1"

    def start(self) -> "OpenAIFront":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(60)
        return self

    async def _start(self):
        import tritonclient.grpc.aio as grpcaio

        self.client = grpcaio.InferenceServerClient(self.grpc_url)
        app = web.Application()
        app.add_routes([web.get("/v1/models", self.models), web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions)])
        # a client that goes away cancels its handler, which cancels the gRPC stream
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._runner is not None:
            async def shutdown():
                await self._runner.cleanup()
                await self.client.close()

            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
            self._runner = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "OpenAIFront":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ routes
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "tidar"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
            echo = bool(body.get("echo", False))
            return await self._generate(request, body, prompt, chat=False, echo=echo,
                                        max_tokens=_number(body, "max_tokens", int, 1, None, default=16))
        except APIError as error:
            return error.response()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise APIError(400, "'messages' must be a non-empty list of {role, content} objects with text "
                               "content", "messages")
            if self.chat_template is None:
                raise APIError(400, f"model {self.served_name!r} has no chat template (no 'chat_template' in its "
                               "tokenizer_config.json); use /v1/completions", "messages")
            prompt = self.chat_template.render(messages)
            max_tokens = _number(body, "max_completion_tokens", int, 1, None)
            max_tokens = max_tokens or _number(body, "max_tokens", int, 1, None)
            return await self._generate(request, body, prompt, chat=True, echo=False, max_tokens=max_tokens)
        except APIError as error:
            return error.response()

    # ------------------------------------------------------------ forwarding
    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.served_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.served_name!r}",
                           "model", "not_found_error")
        return body

    async def _generate(self, request, body, prompt, chat, echo, max_tokens):
        import tritonclient.grpc as grpcclient

        values = sampling_inputs(body)
        log_probs = wants_log_probs(body, chat, echo)
        count = values["num_return_sequences"]
        limit = max_tokens or 16
        arrays = request_arrays(prompt, limit, stream=True, exclude_input_in_output=True,
                                return_log_probs=log_probs or None, **values)
        inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, list(array.shape), INPUT_SPECS[name].wire_type)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = ["text_output", "output_ids", "finish_reason"] + (["sequence_index"] if count > 1 else [])
        outputs += ["output_log_probs"] if log_probs else []

        async def requests():
            yield {"model_name": self.triton_model, "inputs": inputs,
                   "outputs": [grpcclient.InferRequestedOutput(name) for name in outputs]}

        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        meta = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.served_name}
        prompt_tokens = len(self.tokenizer.encode(prompt))
        stream = bool(body.get("stream", False))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        responses = self.client.stream_infer(requests())
        texts, tokens, reasons = [""] * count, [0] * count, [None] * count
        scored = [[] for _ in range(count)]  # (token id, log prob) of each sequence, when asked for
        text_offsets = [0] * count  # streamed: the length of the tokens' texts sent so far
        sse = None
        try:
            async for result, error in responses:
                if error is not None:
                    raise _triton_error(str(error))
                index = int(result.as_numpy("sequence_index").reshape(-1)[0]) if count > 1 else 0
                piece = result.as_numpy("text_output")[0].decode("utf-8")
                ids = result.as_numpy("output_ids").reshape(-1).tolist()
                tokens[index] += len(ids)
                new_scored = list(zip(ids, result.as_numpy("output_log_probs").reshape(-1).tolist())) if log_probs \
                    else []
                scored[index] += new_scored
                reason = result.as_numpy("finish_reason").reshape(-1)[0].decode() or None
                reasons[index] = FINISH_REASONS.get(reason, reason) if reason else None
                if stream:
                    if sse is None:
                        sse = await self._open_sse(request)
                        if chat:
                            for i in range(count):
                                await _send(sse, {**meta, "object": "chat.completion.chunk", "choices": [
                                    {"index": i, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]})
                        elif echo:
                            for i in range(count):
                                await _send(sse, {**meta, "choices": [{"index": i, "text": prompt,
                                                                       "finish_reason": None}]})
                    if piece or reasons[index] or new_scored:
                        choice = ({"index": index, "delta": {"content": piece} if piece else {},
                                   "finish_reason": reasons[index]} if chat else
                                  {"index": index, "text": piece, "finish_reason": reasons[index]})
                        if log_probs:
                            choice["logprobs"], text_offsets[index] = self._log_probs_body(new_scored, chat,
                                                                                           text_offsets[index])
                        chunk = {**meta, "choices": [choice]}
                        if chat:
                            chunk["object"] = "chat.completion.chunk"
                        await _send(sse, chunk)
                else:
                    texts[index] += piece
                if all(reasons):
                    break
        except APIError as error:
            if sse is None:
                return error.response()
            await _send(sse, {"error": {"message": error.message, "type": error.kind, "param": error.param,
                                        "code": None}})
            await sse.write(b"data: [DONE]\n\n")
            return sse
        finally:
            if not all(reasons):  # a request still running is cancelled in the model (docs/design.md §6.1)
                responses.cancel()
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(tokens),
                 "total_tokens": prompt_tokens + sum(tokens)}
        if stream:
            if sse is None:
                sse = await self._open_sse(request)
            if include_usage:
                await _send(sse, {**meta, "object": "chat.completion.chunk" if chat else meta["object"],
                                  "choices": [], "usage": usage})
            await sse.write(b"data: [DONE]\n\n")
            await sse.write_eof()
            return sse
        scores = [self._log_probs_body(scored[i], chat, 0)[0] if log_probs else None for i in range(count)]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": reasons[i], "logprobs": scores[i]} for i in range(count)]
        else:
            choices = [{"index": i, "text": (prompt if echo else "") + texts[i], "finish_reason": reasons[i],
                        "logprobs": scores[i]} for i in range(count)]
        return web.json_response({**meta, "choices": choices, "usage": usage})

    def _log_probs_body(self, scored: list[tuple[int, float]], chat: bool, offset: int) -> tuple[dict, int]:
        """OpenAI's `logprobs` object for tokens (id, log prob), and the text offset after them:
        each token's text is its own decoding, `offset` the length of the texts before the first
        (completions' text_offset)."""
        texts = [self.tokenizer.decode([token]) for token, _ in scored]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        if chat:
            return {"content": [{"token": text, "logprob": value, "bytes": list(text.encode("utf-8")),
                                 "top_logprobs": []} for text, (_, value) in zip(texts, scored)]}, offset
        return {"tokens": texts, "token_logprobs": [value for _, value in scored], "top_logprobs": None,
                "text_offset": offsets}, offset

    async def _open_sse(self, request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response


async def _send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _triton_error(message: str) -> APIError:
    """The model's error as an OpenAI error: overloaded -> 503, a refused request -> 400, else 500."""
    if "overloaded" in message or "shutting down" in message:
        return APIError(503, message, kind="server_error")
    if "input '" in message or "inputs '" in message or "too long" in message:
        return APIError(400, message)
    return APIError(500, message, kind="server_error")


def served_name_of(model_dir: Path) -> str:
    """The model id /v1/models lists: the exported checkpoint's folder name (manifest.json of a
    `tidar-export build` output), else the folder's own name."""
    manifest = Path(model_dir) / "manifest.json"
    if manifest.is_file():
        checkpoint = json.loads(manifest.read_text()).get("inputs", {}).get("checkpoint")
        if checkpoint:
            return Path(checkpoint).name
    return Path(model_dir).name


def model_dir_of(repo: str | Path, model: str = "tidar") -> Path:
    """The checkpoint folder a rendered repository's model serves (its `model_dir` parameter)."""
    import re

    folder = Path(repo) / model
    text = (folder / "config.pbtxt").read_text()
    match = re.search(r'key: "model_dir" value: \{ string_value: "([^"]*)" \}', text)
    if not match:
        raise ValueError(f"{folder / 'config.pbtxt'}: no model_dir parameter")
    path = Path(match.group(1))
    return (path if path.is_absolute() else folder / path).resolve()


"""OpenAI-compatible HTTP front of a served TiDAR model (`tidar serve REPO --openai-port P`).

    with OpenAIFront(grpc_url="localhost:8001", model_dir=CHECKPOINT, port=0, api_key="k") as front:
        ...  # front.url -> "http://localhost:PORT/v1"

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (OpenAI's request
and response bodies; `stream: true` answers with server-sent events ending in `data: [DONE]`;
`stream_options.include_usage` adds a last chunk with the usage and no choices), and `GET /health`
(200 once the Triton model is ready, 503 otherwise). Every prompt is forwarded to the Triton model
over gRPC (tritonclient's asyncio client, one stream per prompt), so Triton's model and its
scheduler stay the one place that batches; a client that disconnects cancels its gRPC streams,
and the model frees the rows at its next step.

As vLLM's server:
- **API key** (`api_key`, `tidar serve --api-key` or TIDAR_API_KEY): every `/v1` route,
  `/v1/models` included, needs `Authorization: Bearer KEY`, else a 401 (compared in constant
  time); `/health` stays open.
- **Prompts** (completions): a string, a list of strings, a list of token ids or a list of token-id
  lists. Token ids go to the model as they are (its `input_ids` input), never re-tokenised; each
  prompt's choices are `choices[i * n + j]` (prompt i, sequence j), as vLLM numbers them; the
  usage sums the prompts' tokens.
- **Sampling defaults**: a parameter the request leaves unset takes the checkpoint's
  generation_config.json default (`GenerationDefaults`, docs/design.md), else OpenAI's
  (temperature 1, top_p 1, all tokens); `temperature` 0 is greedy whatever the checkpoint says,
  and so is `top_p` 0. `top_k` is accepted as vLLM's extension (-1 or 0 = all tokens).
- **Chat**: the checkpoint's own chat template (chat_template.jinja, else tokenizer_config.json's
  `chat_template`) rendered as `transformers`' `apply_chat_template` renders it (`ChatTemplate`);
  the rendered text is tokenised without special tokens (the template writes them), as both do.
  `add_generation_prompt` (default true) and `chat_template_kwargs` are vLLM's extensions; a
  message's `content` may be a string or a list of text parts (joined with newlines, vLLM's
  "string" content format).

Parameters: `max_tokens` (chat: also `max_completion_tokens`; checked here against the int32 the
model takes, then by the model against its limit), `temperature`, `top_p`, `top_k`, `seed`,
`stop`, `n`, `stream`, `stream_options`, `echo` (completions), `presence_penalty` and
`frequency_penalty` (in [-2, 2]; forwarded to the model's inputs of the same names, so they count
the prompt's tokens too, as TensorRT-LLM does: docs/design.md §3.7), the sampled tokens' log
probs (completions: `logprobs` = 0; chat: `logprobs` true with no `top_logprobs`; the model's
`return_log_probs`, so a greedy token's is 0 as there). Alternatives (`logprobs` > 0,
`top_logprobs` > 0), `echo` with `logprobs`, `logit_bias`, `best_of` > n, `tools`, `suffix` and a
`response_format` other than text are refused with a 400 naming the parameter; so is every
malformed value. Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from aiohttp import web

from tidar.runtime.generation_config import GenerationDefaults
from tidar.serving.wire import INPUT_SPECS, request_arrays

INT32_MAX = 2 ** 31 - 1
"""The model's `max_tokens` is an int32: larger values are refused here, with the value sent."""
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length"}
REFUSED = {"logit_bias": None, "tools": None, "functions": None, "suffix": None}
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens a chat template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES)."""
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
"""Names of a message's reasoning; transformers fills the first two from whichever is given."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return web.json_response(self.body(), status=self.status, headers=headers)


# ---------------------------------------------------------------------------- chat templates
def load_chat_template(model_dir: Path) -> tuple[str | None, dict]:
    """(chat template or None, named special tokens) of a checkpoint, found where transformers
    finds them: chat_template.jinja takes priority over tokenizer_config.json's `chat_template`
    (a string, or a list of {name, template} of which "default" is used without tools); the
    special tokens are tokenizer_config.json's (an AddedToken object counts by its content),
    those it leaves out taken from a legacy special_tokens_map.json."""
    folder = Path(model_dir)
    config = _json_object(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: field 'chat_template' must be a string or a list "
                         f"of {{name, template}} with a 'default', got {type(template).__name__}")
    legacy = _json_object(folder / "special_tokens_map.json")
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name, legacy.get(name))
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[name] = value
    return template, tokens


def _json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class ChatTemplate:
    """A checkpoint's chat template, rendered as `transformers`' `apply_chat_template(...,
    tokenize=False)` renders it: Jinja's immutable sandbox with trim_blocks and lstrip_blocks, the
    `loopcontrols` extension and the `{% generation %}` tag (rendered as its body), a `tojson`
    filter that is `json.dumps` (no HTML escaping; ensure_ascii, indent, separators, sort_keys),
    the globals `raise_exception`, `strftime_now`, and `dict` / `namespace` that refuse
    underscore-prefixed names; the variables are `messages` (None-valued keys dropped, reasoning
    aliased as transformers aliases it), `tools` and `documents` (None), `add_generation_prompt`,
    the named special tokens, then any extra keyword arguments."""

    def __init__(self, source: str, special_tokens: dict | None = None):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.errors = jinja2.exceptions.TemplateError
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals.update(raise_exception=_raise_template_error, strftime_now=_strftime_now,
                                   dict=_TemplateDict(), namespace=_template_namespace())
        self.template = environment.from_string(source)
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_folder(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The checkpoint's template (None when it has none)."""
        source, tokens = load_chat_template(Path(model_dir))
        return None if source is None else cls(source, tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt of a conversation; a template error becomes a 400 naming `messages`."""
        prepared = [_alias_reasoning({key: value for key, value in message.items() if value is not None})
                    for message in messages]
        variables = {**self.special_tokens, **kwargs}
        try:
            return self.template.render(messages=prepared, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except self.errors as error:
            raise APIError(400, f"the chat template refused the messages: {error}", "messages") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            raise APIError(400, f"the chat template failed on the messages: {type(error).__name__}: {error}",
                           "messages") from None


def _raise_template_error(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format_: str) -> str:
    return datetime.now().strftime(format_)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[name] for name in REASONING_FIELDS if message.get(name) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _TemplateDict:
    """`dict(...)` in a template: builds a plain dict, exposes nothing else of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _template_namespace():
    """`namespace(...)` in a template: Jinja's Namespace, refusing underscore-prefixed attributes."""
    import jinja2
    from jinja2.utils import Namespace

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the underscore-prefixed attribute "
                                                  f"{name!r} on a namespace")

    class TemplateNamespace(Namespace):
        def __init__(*args, **kwargs):  # Namespace's signature: `self` may be an attribute name too
            self, values = args[0], dict(*args[1:], **kwargs)
            for name in values:
                check(name)
            Namespace.__init__(self, values)

        def __setitem__(self, name, value):
            check(name)
            Namespace.__setitem__(self, name, value)

    return TemplateNamespace


def _generation_tag():
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): its body."""

        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

        def _body(self, caller):
            return caller()

    return GenerationTag


_GenerationTag = _generation_tag()


# ---------------------------------------------------------------------------- request fields
def _number(body: dict, name: str, kind, low=None, high=None, default=None):
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise APIError(400, f"'{name}' must be {'in ' if high is not None else ''}{bounds}, got {value!r}", name)
    return kind(value)


def _flag(body: dict, name: str, default: bool = False, where: str | None = None) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{where or name}' must be a boolean, got {value!r}", where or name)
    return value


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage): `stream_options` is an object, allowed only with `stream` true."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise APIError(400, f"'stream_options' must be an object, got {options!r}", "stream_options")
    if not stream:
        raise APIError(400, "'stream_options' can only be given with 'stream': true", "stream_options")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise APIError(400, f"'stream_options' has unknown field(s) {unknown}", "stream_options")
    if options.get("continuous_usage_stats"):
        raise APIError(400, "'stream_options.continuous_usage_stats' is not supported by this server",
                       "stream_options.continuous_usage_stats")
    return stream, _flag(options, "include_usage", where="stream_options.include_usage")


def sampling_inputs(body: dict, defaults: GenerationDefaults | None = None) -> dict:
    """The Triton inputs of OpenAI's sampling parameters, every one sent: a parameter the request
    leaves unset takes the checkpoint's generation_config.json default, else OpenAI's
    (temperature 1, top_p 1, top_k 0 = all tokens); temperature 0 or top_p 0 is greedy. Refuses
    what the model cannot honour, by name."""
    for name, neutral in REFUSED.items():
        if body.get(name, neutral) not in (neutral, None, False, [], {}):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    count = _number(body, "n", int, 1, 16, default=1)
    if body.get("best_of") not in (None, 1, count):
        raise APIError(400, "'best_of' is not supported by this server", "best_of")
    format_ = body.get("response_format")
    if format_ not in (None, {"type": "text"}):
        raise APIError(400, "'response_format' other than text is not supported by this server", "response_format")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
                             or len(stop) > 4):
        raise APIError(400, f"'stop' must be a string or a list of at most 4 strings, got {body.get('stop')!r}",
                       "stop")
    seed = _number(body, "seed", int)
    top_k = _number(body, "top_k", int, -1)
    chosen = {"temperature": _number(body, "temperature", float, 0, 2), "top_p": _number(body, "top_p", float, 0, 1),
              "top_k": None if top_k is None else max(top_k, 0)}
    if defaults is not None:
        chosen = defaults.apply(chosen)
    temperature = 1.0 if chosen.get("temperature") is None else float(chosen["temperature"])
    top_p = 1.0 if chosen.get("top_p") is None else float(chosen["top_p"])
    if top_p == 0:  # nothing kept but the likeliest token: greedy (the model's top_p 0 would mean unset)
        temperature, top_p = 0.0, 1.0
    return {"temperature": temperature, "top_p": top_p, "top_k": int(chosen.get("top_k") or 0),
            "presence_penalty": _number(body, "presence_penalty", float, -2, 2),
            "frequency_penalty": _number(body, "frequency_penalty", float, -2, 2),
            "seed": None if seed is None else seed % 2 ** 64,
            "stop_words": [s for s in stop or [] if s] or None,
            "num_return_sequences": count}


def wants_log_probs(body: dict, chat: bool, echo: bool) -> bool:
    """Whether the sampled tokens' log probs are asked for (no alternatives: the model returns
    only the chosen token's)."""
    if chat:
        if body.get("top_logprobs") not in (None, 0):
            raise APIError(400, "'top_logprobs' is not supported by this server (no alternatives)", "top_logprobs")
        return _flag(body, "logprobs")
    if body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' is a chat parameter; completions use 'logprobs'", "top_logprobs")
    wanted = _number(body, "logprobs", int, 0, 5)
    if wanted:
        raise APIError(400, "'logprobs' > 0 is not supported by this server (no alternatives): send 0", "logprobs")
    if wanted is not None and echo:
        raise APIError(400, "'logprobs' with 'echo' is not supported by this server", "logprobs")
    return wanted is not None


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its text (what `echo` shows) and, when it came as token ids or
    from a chat template, the ids the model gets as they are."""

    text: str
    token_ids: tuple[int, ...] | None
    tokens: int
    """Its number of tokens (the usage's prompt_tokens)."""


def completion_prompts(value, tokenizer, vocab_size: int) -> list[Prompt]:
    """The prompts of a completions request's `prompt`: a string, a list of strings, a list of
    token ids or a list of token-id lists (OpenAI's four forms); anything else is a 400 naming
    `prompt` and what is wrong."""
    def token_prompt(ids, where):
        if not ids:
            raise APIError(400, f"'{where}' is an empty token list: at least one token is needed", "prompt")
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise APIError(400, f"'{where}[{position}]' must be a token id in [0, {vocab_size}), got {token!r}",
                               "prompt")
        return Prompt(tokenizer.decode(list(ids)), tuple(ids), len(ids))

    def text_prompt(text, where):
        if not text:
            raise APIError(400, f"'{where}' is empty: at least one token is needed", "prompt")
        return Prompt(text, None, len(tokenizer.encode(text)))

    if isinstance(value, str):
        return [text_prompt(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                       f"token-id lists, non-empty; got {_short(value)}", "prompt")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [token_prompt(value, "prompt")]
    prompts = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(text_prompt(item, f"prompt[{index}]"))
        elif isinstance(item, list):
            prompts.append(token_prompt(item, f"prompt[{index}]"))
        else:
            raise APIError(400, f"'prompt[{index}]' must be a string or a list of token ids, got {_short(item)} "
                           "(a list of prompts holds strings or token-id lists, not single ids)", "prompt")
    return prompts


def chat_messages(body: dict) -> list[dict]:
    """The request's `messages`, checked: objects with a string `role` and a `content` that is a
    string, a list of text parts (joined with newlines) or, for an assistant, null."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, f"'messages' must be a non-empty list of messages, got {_short(messages)}", "messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"'{where}' must be an object with 'role' and 'content', got {_short(message)}",
                           "messages")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise APIError(400, f"'{where}.role' must be a non-empty string, got {_short(role)}", "messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"'{where}.content[{part_index}]' must be a text part {{\"type\": \"text\", "
                                   f"\"text\": ...}} (this model reads text only), got {_short(part)}", "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None and role != "assistant" or content is not None and not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string or a list of text parts, got {_short(content)}",
                           "messages")
        checked.append({**message, "content": content})
    return checked


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- the server
@dataclass
class _Event:
    """What one Triton response adds to choice `index`."""

    index: int
    text: str
    token_ids: list[int]
    scored: list[tuple[int, float]]
    reason: str | None


class OpenAIFront:
    """The HTTP front (aiohttp) on its own thread and event loop; `start()` returns once it listens.
    `api_key`: the Bearer token every /v1 route needs (None: no authentication)."""

    def __init__(self, grpc_url: str, model_dir: str | Path, port: int = 8080, host: str = "0.0.0.0",
                 triton_model: str = "tidar", served_name: str | None = None, api_key: str | None = None):
        from tidar.runtime.tokenizer import Tokenizer

        if api_key is not None and not api_key:
            raise ValueError("api_key is empty: give a key, or None for no authentication")
        self.grpc_url, self.host, self.port = grpc_url, host, port
        self.triton_model = triton_model
        self.model_dir = Path(model_dir)
        self.served_name = served_name or served_name_of(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        self.vocab_size = _json_object(self.model_dir / "config.json").get("vocab_size") or self.tokenizer.vocab_size
        self.chat_template = ChatTemplate.from_folder(self.model_dir)
        self.defaults = GenerationDefaults.from_folder(self.model_dir)  # generation_config.json's sampling defaults
        self._key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()
        self.created = int(time.time())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tidar-openai", daemon=True)
        self._runner = None

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    def start(self) -> "OpenAIFront":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(60)
        return self

    async def _start(self):
        import tritonclient.grpc.aio as grpcaio

        self.client = grpcaio.InferenceServerClient(self.grpc_url)
        app = web.Application(middlewares=[self._authenticate])
        app.add_routes([web.get("/v1/models", self.models), web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions), web.get("/health", self.health)])
        # a client that goes away cancels its handler, which cancels the gRPC streams
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host or None, self.port).start()
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
    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        """vLLM's rule: with a key, every /v1 route needs `Authorization: Bearer KEY` (401 otherwise)."""
        if self._key_digest is not None and request.path.startswith("/v1") and request.method != "OPTIONS":
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                                code="invalid_api_key").response()
            if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._key_digest):
                return APIError(401, "incorrect API key in the 'Authorization' header", None,
                                code="invalid_api_key").response()
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        try:
            ready = await self.client.is_model_ready(self.triton_model)
        except Exception:  # noqa: BLE001 - the server is unreachable: not ready
            ready = False
        return web.Response(status=200 if ready else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "tidar",
             "root": str(self.model_dir)}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            prompts = completion_prompts(body.get("prompt"), self.tokenizer, self.vocab_size)
            echo = _flag(body, "echo")
            return await self._generate(request, body, prompts, chat=False, echo=echo,
                                        max_tokens=_number(body, "max_tokens", int, 1, INT32_MAX, default=16))
        except APIError as error:
            return error.response()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            messages = chat_messages(body)
            if self.chat_template is None:
                raise APIError(400, f"model {self.served_name!r} has no chat template (no chat_template.jinja and no "
                               "'chat_template' in its tokenizer_config.json); use /v1/completions", "messages")
            extra = body.get("chat_template_kwargs") or {}
            if not isinstance(extra, dict):
                raise APIError(400, f"'chat_template_kwargs' must be an object, got {_short(extra)}",
                               "chat_template_kwargs")
            text = self.chat_template.render(messages, add_generation_prompt=_flag(body, "add_generation_prompt", True),
                                             **extra)
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))  # the template wrote them
            if not ids:
                raise APIError(400, "the chat template rendered the messages as an empty prompt", "messages")
            max_tokens = _number(body, "max_completion_tokens", int, 1, INT32_MAX)
            max_tokens = max_tokens or _number(body, "max_tokens", int, 1, INT32_MAX)
            return await self._generate(request, body, [Prompt(text, ids, len(ids))], chat=True, echo=False,
                                        max_tokens=max_tokens or 16)
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

    def _triton_request(self, prompt: Prompt, max_tokens: int, values: dict, log_probs: bool) -> dict:
        import tritonclient.grpc as grpcclient

        arrays = request_arrays(prompt.text, max_tokens, stream=True, exclude_input_in_output=True,
                                return_log_probs=log_probs or None,
                                input_ids=list(prompt.token_ids) if prompt.token_ids is not None else None, **values)
        inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, list(array.shape), INPUT_SPECS[name].wire_type)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = ["text_output", "output_ids", "finish_reason"]
        outputs += ["sequence_index"] if values["num_return_sequences"] > 1 else []
        outputs += ["output_log_probs"] if log_probs else []
        return {"model_name": self.triton_model, "inputs": inputs,
                "outputs": [grpcclient.InferRequestedOutput(name) for name in outputs]}

    async def _pump(self, responses, first: int, count: int, log_probs: bool, queue: asyncio.Queue, done: list):
        """Put the events of one prompt's gRPC stream on `queue` until its `count` sequences end
        (choices first .. first + count - 1), then None; an error is put as an APIError."""
        finished = 0
        try:
            async for result, error in responses:
                if error is not None:
                    await queue.put(_triton_error(str(error)))
                    return
                index = first + (int(result.as_numpy("sequence_index").reshape(-1)[0]) if count > 1 else 0)
                ids = result.as_numpy("output_ids").reshape(-1).tolist()
                scored = list(zip(ids, result.as_numpy("output_log_probs").reshape(-1).tolist())) if log_probs \
                    else []
                reason = result.as_numpy("finish_reason").reshape(-1)[0].decode() or None
                await queue.put(_Event(index, result.as_numpy("text_output")[0].decode("utf-8"), ids, scored,
                                       FINISH_REASONS.get(reason, reason) if reason else None))
                finished += reason is not None
                if finished == count:
                    done.append(responses)  # ended: closed without a cancel (docs/design.md §6.1)
                    break
            else:
                await queue.put(APIError(500, "the model ended a stream before its final response",
                                         kind="server_error"))
                return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a broken stream is this request's error, not the server's
            await queue.put(APIError(500, f"the stream to the model failed: {error}", kind="server_error"))
            return
        await queue.put(None)

    async def _generate(self, request, body, prompts: list[Prompt], chat: bool, echo: bool, max_tokens: int):
        values = sampling_inputs(body, self.defaults)
        log_probs = wants_log_probs(body, chat, echo)
        stream, include_usage = stream_flags(body)
        n = values["num_return_sequences"]
        count = len(prompts) * n
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        meta = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.served_name}
        chunk_object = "chat.completion.chunk" if chat else "text_completion"
        queue: asyncio.Queue = asyncio.Queue()
        done: list = []
        streams = [self.client.stream_infer(_one(self._triton_request(p, max_tokens, values, log_probs)))
                   for p in prompts]
        pumps = [asyncio.ensure_future(self._pump(s, i * n, n, log_probs, queue, done)) for i, s in enumerate(streams)]
        texts, tokens, reasons = [""] * count, [0] * count, [None] * count
        scored = [[] for _ in range(count)]  # (token id, log prob) of each choice, when asked for
        text_offsets = [0] * count  # streamed: the length of the tokens' texts sent so far
        sse = None
        try:
            open_streams = len(streams)
            while open_streams:
                event = await queue.get()
                if event is None:
                    open_streams -= 1
                    continue
                if isinstance(event, APIError):
                    raise event
                index = event.index
                tokens[index] += len(event.token_ids)
                scored[index] += event.scored
                reasons[index] = event.reason
                if not stream:
                    texts[index] += event.text
                    continue
                if sse is None:
                    sse = await self._open_sse(request)
                    for i in range(count):  # the role (chat) or the echoed prompt first, per choice
                        if chat:
                            await _send(sse, {**meta, "object": chunk_object, "choices": [
                                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]})
                        elif echo:
                            await _send(sse, {**meta, "choices": [{"index": i, "text": prompts[i // n].text,
                                                                   "logprobs": None, "finish_reason": None}]})
                if event.text or event.reason or event.scored:
                    choice = ({"index": index, "delta": {"content": event.text} if event.text else {},
                               "logprobs": None, "finish_reason": event.reason} if chat else
                              {"index": index, "text": event.text, "logprobs": None, "finish_reason": event.reason})
                    if log_probs:
                        choice["logprobs"], text_offsets[index] = self._log_probs_body(event.scored, chat,
                                                                                       text_offsets[index])
                    await _send(sse, {**meta, "object": chunk_object, "choices": [choice]})
        except APIError as error:
            if sse is None:
                return error.response()
            await _send(sse, error.body())
            await sse.write(b"data: [DONE]\n\n")
            return sse
        finally:
            for pump in pumps:
                pump.cancel()
            for responses in streams:  # a request still running is cancelled in the model (docs/design.md §6.1)
                if not any(responses is ended for ended in done):
                    responses.cancel()
        prompt_tokens = sum(p.tokens for p in prompts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(tokens),
                 "total_tokens": prompt_tokens + sum(tokens)}
        if stream:
            if sse is None:
                sse = await self._open_sse(request)
            if include_usage:  # OpenAI's last chunk: the usage, no choices
                await _send(sse, {**meta, "object": chunk_object, "choices": [], "usage": usage})
            await sse.write(b"data: [DONE]\n\n")
            await sse.write_eof()
            return sse
        scores = [self._log_probs_body(scored[i], chat, 0)[0] if log_probs else None for i in range(count)]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": reasons[i], "logprobs": scores[i]} for i in range(count)]
        else:
            choices = [{"index": i, "text": (prompts[i // n].text if echo else "") + texts[i],
                        "finish_reason": reasons[i], "logprobs": scores[i]} for i in range(count)]
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


async def _one(item):
    yield item


async def _send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _triton_error(message: str) -> APIError:
    """The model's error as an OpenAI error: overloaded -> 503, a refused request -> 400 (naming
    the OpenAI parameter when the model's input has its name), else 500."""
    import re

    if "overloaded" in message or "shutting down" in message:
        return APIError(503, message, kind="server_error")
    if "input '" in message or "inputs '" in message or "too long" in message:
        named = re.search(r"input '(\w+)'", message)
        param = {"max_tokens": "max_tokens", "input_ids": "prompt", "text_input": "prompt"}.get(
            named.group(1) if named else "")
        return APIError(400, message, param)
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

"""`tidar client`: send a prompt to a served `tidar` model over gRPC (tritonclient), streaming.

    result = request("localhost:8001", "def main():", max_tokens=48, on_text=print)

`request` builds the input tensors of the `tidar` model from the wire contract
(serving/wire.py: tensorrtllm_backend's names and shapes; it asks for the generated text only,
`exclude_input_in_output`), opens a gRPC stream, collects one response per decode step (text, token ids, counters, arrival times)
and returns a `ClientResult` with the whole output, the finish reason and timing (time to
first token, inter-token gaps). An error response raises `ClientError` with the server's
message. The CLI prints the text as it arrives and then one stats line.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field

import numpy as np

from tidar.serving.wire import INPUT_SPECS, request_arrays

DEFAULT_URL = "localhost:8001"
MODEL = "tidar"


class ClientError(RuntimeError):
    """The server answered with an error (the message is the server's)."""


@dataclass
class ClientResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    forward_passes: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    started: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    """perf_counter() of every response that carried tokens."""
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def time_to_first_token(self) -> float | None:
        return self.arrivals[0] - self.started if self.arrivals else None

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive responses that carried tokens (one response per decode step)."""
        return list(np.diff(self.arrivals)) if len(self.arrivals) > 1 else []

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.forward_passes if self.forward_passes else 0.0


def build_inputs(text: str, max_tokens: int, stream: bool = True, **options) -> list:
    """The gRPC input tensors; `options` are optional inputs of the contract by name (seed,
    temperature, top_p, top_k, stop_words, end_id, draft_len, mode, timeout, ...)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in request_arrays(text, max_tokens, stream=stream, **options).items():
        tensor = grpcclient.InferInput(name, list(array.shape), INPUT_SPECS[name].wire_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def request(url: str, text: str, max_tokens: int = 64, stream: bool = True, on_text=None, model: str = MODEL,
            response_timeout: float = 600.0, **options) -> ClientResult:
    """One generation over a gRPC stream; see the module docstring. `response_timeout` bounds the
    wait for each response here; the `timeout` option asks the server to end the request."""
    options.setdefault("exclude_input_in_output", True)
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    result = ClientResult()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
        result.started = time.perf_counter()
        client.async_stream_infer(model, build_inputs(text, max_tokens, stream, **options),
                                  enable_empty_final_response=True)
        while True:
            try:
                response, error, arrived = responses.get(timeout=response_timeout)
            except queue.Empty:
                raise ClientError(f"no response from {url} within {response_timeout:.0f} s") from None
            if error is not None:
                raise ClientError(str(error.message() if hasattr(error, "message") else error))
            final = response.get_response().parameters["triton_final_response"].bool_param
            if response.as_numpy("text_output") is not None:
                _absorb(result, response, arrived, on_text)
            if final:
                finished = True
                result.finished = arrived
                return result
    finally:
        # Cancel only a request left unfinished (an error, no response in time, an interrupt): with
        # Triton 24.10, cancelling a stream whose request has already ended leaks a reference to the
        # model now and then, and the server then cannot unload it when it stops (docs/design.md §6.1).
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _absorb(result: ClientResult, response, arrived: float, on_text) -> None:
    piece = response.as_numpy("text_output")[0].decode("utf-8")
    ids = response.as_numpy("output_ids").reshape(-1).tolist()
    result.text += piece
    result.token_ids += ids
    if ids:
        result.arrivals.append(arrived)
    reason = response.as_numpy("finish_reason").reshape(-1)[0].decode()
    result.finish_reason = reason or result.finish_reason
    result.forward_passes = int(response.as_numpy("num_forward_passes").reshape(-1)[0])
    result.draft_tokens = int(response.as_numpy("num_draft_tokens").reshape(-1)[0])
    result.accepted_draft_tokens = int(response.as_numpy("num_accepted_draft_tokens").reshape(-1)[0])
    if on_text and piece:
        on_text(piece)


def default_url() -> str:
    return os.environ.get("TIDAR_GRPC_URL", DEFAULT_URL)

"""The Triton Python-backend model `tensorrt_llm`: TensorRT-LLM's LLM-API contract (decoupled,
max_batch_size 0), served by forwarding every request to the `tidar` model of the same server.

triton_repo/tensorrt_llm/1/model.py imports `TritonPythonModel` from here. The model holds no
weights and no scheduler: each request is parsed by `tidar.serving.llmapi.parse_llmapi_request`
(a refused one gets an INVALID_ARG error naming the input), sent to the `tidar` model as one
streaming BLS request (`pb_utils.InferenceRequest(...).exec(decoupled=True)`) on a thread of its
own, and every `tidar` response is turned into this contract's by `LlmapiReply`: one response per
decode step when streaming, else one at the end. So one scheduler and one copy of the weights
serve `tidar`, `ensemble` and `tensorrt_llm` (docs/design.md §6.2). An error of the `tidar` model
comes back with its code and with the inputs renamed to this contract's names.

Only numpy, Triton's utilities and the wire/llmapi modules are imported (no torch): the process
stays small.
"""

import json
import threading

import triton_python_backend_utils as pb_utils

from .llmapi import TIDAR_OUTPUTS, LlmapiReply, LlmapiRequestError, llmapi_message, parse_llmapi_request
from .wire import LLMAPI_INPUTS, request_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.target = params.get("tidar_model", "tidar")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), name="tensorrt_llm-request", daemon=True).start()
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        inputs = request_inputs(request, LLMAPI_INPUTS, pb_utils.get_input_tensor_by_name)
        try:
            parsed = parse_llmapi_request(inputs, _parameters(request))
        except LlmapiRequestError as error:
            return _send_error(sender, str(error), pb_utils.TritonError.INVALID_ARG)
        if parsed.streaming and not self.decoupled:
            return _send_error(sender, "input 'streaming' = True needs a decoupled model (model_transaction_policy "
                               "decoupled: true)", pb_utils.TritonError.INVALID_ARG)
        forward = pb_utils.InferenceRequest(
            model_name=self.target, requested_output_names=list(TIDAR_OUTPUTS),
            inputs=[pb_utils.Tensor(name, array) for name, array in parsed.tidar_inputs.items()])
        reply = LlmapiReply(parsed)
        try:
            for response in forward.exec(decoupled=True):
                if response.has_error():
                    error = response.error()
                    return _send_error(sender, llmapi_message(error.message()), error.code())
                final = response.get_final_flag() if hasattr(response, "get_final_flag") else False
                outputs = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}
                if not outputs and not final:
                    continue
                finished = final or _finished(outputs)
                tensors = reply.add(outputs, finished)
                if sender.is_cancelled():  # the `tidar` row runs on to its end (see docs/design.md §6.2)
                    return _send_error(sender, "Request cancelled by client", pb_utils.TritonError.CANCELLED)
                if tensors is not None:
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in tensors.items()]),
                                flags=FINAL if finished else 0)
                if finished:
                    return None
        except Exception as error:  # noqa: BLE001 - the request must get a final response whatever failed
            return _send_error(sender, f"tensorrt_llm: forwarding to model '{self.target}' failed: {error}",
                               pb_utils.TritonError.INTERNAL)
        return _send_error(sender, f"tensorrt_llm: model '{self.target}' ended the request without a final "
                           "response", pb_utils.TritonError.INTERNAL)

    def finalize(self):
        pass


def _parameters(request) -> dict:
    """The request's parameters (the generate endpoint turns JSON fields that name no input into
    parameters), less Triton's own (`triton_*`, e.g. a gRPC stream's enable_empty_final_response)."""
    try:
        given = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return {}
    return {key: value for key, value in given.items() if not key.startswith("triton_")}


def _finished(outputs) -> bool:
    """Whether a `tidar` response is its request's last: the last one carries the finish reason."""
    reason = outputs.get("finish_reason")
    return reason is not None and bool(bytes(reason.reshape(-1)[0]))


def _send_error(sender, message, code):
    try:
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
    except Exception:  # the client is gone; nothing to tell
        pass

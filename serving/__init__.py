"""tidar.serving — everything that faces a network.

wire.py          the request contracts (names, types, shapes), defined once: `tidar`, tensorrtllm_backend's
                 `ensemble`
requests.py      their meaning: parse a request into runtime requests, build response tensors,
                 `ServingOptions` (the one source of serving parameters), `build_scheduler`
scheduler.py     continuous batching of requests onto one `DecodeEngine`
triton_model.py  the Triton Python-backend model (triton_repo/*/1/model.py is a thin call into it)
serve.py         `tidar serve`: run tritonserver on a repository; supervisor.py restarts it
openai_front.py  the OpenAI-compatible HTTP front, forwarding to the Triton model over gRPC
client.py        `tidar client`: NVIDIA's tritonclient over gRPC, streaming
"""

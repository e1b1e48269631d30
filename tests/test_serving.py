"""The serving pieces that need no server: the wire contract (serving/wire.py, against the
published tensorrtllm_backend contract and TensorRT-LLM's sampling defaults), request parsing
(serving/requests.py), the model's parameters, repository rendering (serving/repository.py) and
`tidar serve`'s checks."""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest

from tidar.serving.repository import STRUCTURE_FIELDS, TEMPLATES, RenderError, render_repository, template_fields
from tidar.runtime.config import TiDARConfig
from tidar.runtime.generate import RequestError, Stats
from tidar.serving.options import ServingOptions
from tidar.serving.requests import Timing, parse_request, response_tensors
from tidar.runtime.tokenizer import Tokenizer
from tidar.serving.wire import INPUTS, OUTPUTS, PERF_METRIC_OUTPUTS, request_arrays, sampling_choice
from tidar.serving.serve import ServeError, TritonServer, check_repository


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    folder = tiny_checkpoints["qwen2"]
    return Tokenizer(folder), TiDARConfig.from_file(folder)


def inputs(**values):
    """One request's tensors as Triton hands them to the model: batch dimension of 1 first."""
    arrays = request_arrays("def main():", 8)
    for name, value in values.items():
        if value is None:
            arrays.pop(name, None)
        else:
            arrays[name] = np.asarray(value)[None]
    return arrays


def parse(model, **values):
    tokenizer, config = model
    return parse_request(inputs(**values), tokenizer, config, max_tokens_limit=100)


def test_parse_defaults_and_every_option(model):
    tokenizer, _ = model
    plain = parse(model)
    assert plain.request.prompt_ids == tokenizer.encode("def main():") and plain.request.max_new_tokens == 8
    assert plain.request.sampling.greedy and plain.stream is False and plain.draft_len is None
    assert not plain.exclude_input_in_output and not plain.return_perf_metrics and len(plain.requests) == 1
    full = parse(model, stream=np.array([True]), temperature=np.array([0.7], np.float32),
                 top_p=np.array([0.9], np.float32), top_k=np.array([5], np.int32),
                 seed=np.array([2 ** 63 + 5], np.uint64), stop_words=np.array([b"\n\n", b"#"], np.object_),
                 end_id=np.array([7], np.int32), pad_id=np.array([0], np.int32), draft_len=np.array([3], np.int32),
                 timeout=np.array([2.5], np.float32), exclude_input_in_output=np.array([True]),
                 return_perf_metrics=np.array([True]), beam_width=np.array([1], np.int32),
                 length_penalty=np.array([1.3], np.float32), repetition_penalty=np.array([1.0], np.float32),
                 presence_penalty=np.array([0.0], np.float32), frequency_penalty=np.array([0.0], np.float32),
                 min_tokens=np.array([1], np.int32), bad_words=np.array([b""], np.object_),
                 return_log_probs=np.array([False]), guided_decoding_guide_type=np.array([b""], np.object_))
    sampling = full.request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (
        pytest.approx(0.7), pytest.approx(0.9), 5, 2 ** 63 + 5)
    assert full.request.stop == ("\n\n", "#") and full.request.eos_ids == [7]
    assert full.stream and full.draft_len == 3 and full.timeout == 2.5
    assert full.exclude_input_in_output and full.return_perf_metrics
    assert parse(model, mode=np.array([b"ar"], np.object_)).draft_len == 0
    assert parse(model, random_seed=np.array([9], np.uint64), top_k=np.array([3], np.int32)).request.sampling.seed == 9
    # tensorrtllm_backend's quick-start sends empty stop and bad words: none
    assert parse(model, stop_words=np.array([b""], np.object_), bad_words=np.array([b""], np.object_)).request.stop == ()


def test_several_return_sequences_are_rows_with_consecutive_seeds(model):
    parsed = parse(model, num_return_sequences=np.array([3], np.int32), seed=np.array([2 ** 64 - 2], np.uint64),
                   temperature=np.array([0.8], np.float32), top_p=np.array([1.0], np.float32))
    assert [r.sampling.seed for r in parsed.requests] == [2 ** 64 - 2, 2 ** 64 - 1, 0]
    assert all(r.prompt_ids == parsed.request.prompt_ids for r in parsed.requests)
    unseeded = parse(model, num_return_sequences=np.array([2], np.int32))
    assert [r.sampling.seed for r in unseeded.requests] == [None, None]


@pytest.mark.parametrize("temperature,top_k,top_p,expected", [
    # TensorRT-LLM: temperature 1.0, top_k 0, top_p 0 when left out (DefaultDecodingParams);
    # top_k 0 with top_p 0 is greedy, top_k > 0 with top_p 0 is top-k with top_p 1 (regularizeTopKTopP);
    # tensorrtllm_backend's model.py drops a top_p <= 0.
    (None, None, None, "greedy"),
    (0.7, None, None, "greedy"),
    (0.7, 0, 0.0, "greedy"),
    (0.7, 1, 0.9, "greedy"),
    (0.0, 50, 0.9, "greedy"),
    (0.7, 5, None, (0.7, 5, 1.0)),
    (None, None, 0.9, (1.0, 0, 0.9)),
    (0.5, 0, -1.0, "greedy"),
    (1.3, 20, 0.8, (1.3, 20, 0.8)),
])
def test_sampling_inputs_mean_what_they_mean_in_tensorrt_llm(temperature, top_k, top_p, expected):
    got = sampling_choice(temperature, top_k, top_p)
    assert got == ((0.0, 0, 1.0) if expected == "greedy" else pytest.approx(expected))


@pytest.mark.parametrize("values,message", [
    (dict(text_input=None), "'text_input' is missing"),
    (dict(text_input=np.array([b""], np.object_)), "'text_input' is empty"),
    (dict(text_input=np.array([b"\xff\xfe"], np.object_)), "'text_input' is not valid UTF-8"),
    (dict(text_input=np.array([b"a", b"b"], np.object_)), "'text_input' must hold exactly one value"),
    (dict(max_tokens=None), "'max_tokens' is missing"),
    (dict(max_tokens=np.array([0], np.int32)), r"'max_tokens' must be in \[1, 100\], got 0"),
    (dict(max_tokens=np.array([-3], np.int32)), r"'max_tokens' must be in \[1, 100\], got -3"),
    (dict(max_tokens=np.array([101], np.int32)), r"'max_tokens' must be in \[1, 100\], got 101"),
    (dict(temperature=np.array([-0.5], np.float32)), "'temperature' must be a finite number >= 0"),
    (dict(temperature=np.array([np.nan], np.float32)), "'temperature'"),
    (dict(top_p=np.array([1.5], np.float32)), r"'top_p' must be <= 1"),
    (dict(top_k=np.array([-1], np.int32)), "top_k must be an integer >= 0"),
    (dict(seed=np.array([1], np.uint64), random_seed=np.array([2], np.uint64)), "'seed' = 1 and 'random_seed' = 2"),
    (dict(stop_words=np.array([b"\xc3"], np.object_)), "'stop_words' is not valid UTF-8"),
    (dict(end_id=np.array([99999], np.int32)), "'end_id' must be a token id"),
    (dict(pad_id=np.array([-1], np.int32)), "'pad_id' must be a token id"),
    (dict(mode=np.array([b"fast"], np.object_)), "'mode' must be one of tidar, ar"),
    (dict(mode=np.array([b"ar"], np.object_), draft_len=np.array([4], np.int32)), "contradicts mode 'ar'"),
    (dict(draft_len=np.array([17], np.int32)), r"input 'draft_len' must be an integer in \[0, block_size = 16\] \(0 = AR decoding\), got 17"),
    (dict(timeout=np.array([0.0], np.float32)), "'timeout' must be positive seconds"),
    (dict(num_return_sequences=np.array([0], np.int32)), r"'num_return_sequences' must be in \[1, 16\], got 0"),
    (dict(extra=np.array([1])), r"unknown input\(s\) \['extra'\]"),
    # refused by name: what would change the target distribution or the model's input
    (dict(beam_width=np.array([2], np.int32)), "'beam_width' = 2 is not supported: beam search"),
    # logits processors: out of range values are named
    (dict(repetition_penalty=np.array([0.0], np.float32)), "input repetition_penalty must be a finite number > 0"),
    (dict(presence_penalty=np.array([np.inf], np.float32)), "input presence_penalty must be a finite number"),
    (dict(frequency_penalty=np.array([np.nan], np.float32)), "input frequency_penalty must be a finite number"),
    (dict(min_tokens=np.array([-2], np.int32)), "input min_tokens must be an integer >= 0, got -2"),
    (dict(bad_words=np.array([b"\xff"], np.object_)), "'bad_words' is not valid UTF-8"),
    (dict(bad_words=np.array(["x " * 40], np.object_)), "input bad_words entry .* more than 32"),
    (dict(return_generation_logits=np.array([True])), "'return_generation_logits' = True"),
    (dict(use_draft_logits=np.array([True])), "'use_draft_logits' = True"),
    (dict(lora_task_id=np.array([3], np.uint64)), "'lora_task_id' = 3 is not supported: LoRA"),
    (dict(lora_weights=np.ones((2, 4), np.float16)), "'lora_weights' is not supported: LoRA"),
    (dict(guided_decoding_guide_type=np.array([b"json"], np.object_)), "'guided_decoding_guide_type'"),
    (dict(embedding_bias_words=np.array([b"x"], np.object_)), "'embedding_bias_words'"),
    (dict(image_url_input=np.array([b"http://x/y.png"], np.object_)), "'image_url_input'"),
])
def test_bad_requests_name_the_input(model, values, message):
    with pytest.raises(RequestError, match=message):
        parse(model, **values)


def test_logits_processor_inputs_become_sampling_params(model):
    """Penalties and min_tokens as sent; each bad word tokenised without special tokens (as
    tensorrtllm_backend's preprocessing does), empty ones dropped; return_log_probs on every row."""
    tokenizer, _ = model
    parsed = parse(model, repetition_penalty=np.array([1.3], np.float32), presence_penalty=np.array([-0.5], np.float32),
                   frequency_penalty=np.array([0.25], np.float32), min_tokens=np.array([7], np.int32),
                   bad_words=np.array([b" import", b"", b"def main"], np.object_), return_log_probs=np.array([True]),
                   num_return_sequences=np.array([2], np.int32), seed=np.array([4], np.uint64),
                   temperature=np.array([0.8], np.float32), top_p=np.array([0.9], np.float32))
    for index, request in enumerate(parsed.requests):
        sampling = request.sampling
        assert (sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty) == pytest.approx(
            (1.3, -0.5, 0.25))
        assert sampling.min_tokens == 7 and sampling.seed == 4 + index and request.return_log_probs
        assert sampling.bad_words == (tuple(tokenizer.encode(" import")), tuple(tokenizer.encode("def main")))
    assert parsed.return_log_probs and len(parsed.request.sampling.bad_words[1]) > 1
    plain = parse(model).request
    assert not plain.sampling.processes_logits and not plain.return_log_probs and plain.sampling.min_tokens == 0


def test_a_request_without_the_batch_dimension_is_named(model):
    tokenizer, config = model
    arrays = request_arrays("x", 4)
    arrays["max_tokens"] = np.array([2, 3], np.int32)
    with pytest.raises(RequestError, match=r"'max_tokens' must have a leading batch dimension of 1, got shape \[2\]"):
        parse_request(arrays, tokenizer, config, 100)


def test_response_tensors_follow_the_contract():
    specs = {spec.name: spec for spec in OUTPUTS}
    tensors = response_tensors("héllo", [5, 6], "stop", None)
    assert set(tensors) == {"text_output", "output_ids", "finish_reason", "num_forward_passes", "num_draft_tokens",
                            "num_accepted_draft_tokens", "stop_reason"}
    for name, array in tensors.items():
        assert array.dtype == specs[name].numpy_dtype, name
        # batch dimension first; text_output is one string per request, as tensorrtllm_backend sends it
        assert array.shape == ((1,) if name == "text_output" else (1, 2) if name == "output_ids" else (1, 1)), name
    assert tensors["text_output"][0].decode() == "héllo" and tensors["output_ids"].tolist() == [[5, 6]]
    assert tensors["finish_reason"][0, 0] == b"stop" and tensors["num_forward_passes"].tolist() == [[0]]
    assert tensors["stop_reason"][0, 0] == b""
    assert response_tensors("a", [5], "stop", None, stop_reason="\n")["stop_reason"][0, 0] == b"\n"
    more = response_tensors("", [], None, None, sequence_index=2, timing=Timing(10, 11, 12, 13, cache_slots=7))
    assert [more[n][0, 0] for n in ("kv_cache_alloc_new_blocks", "kv_cache_alloc_total_blocks",
                                    "kv_cache_reused_blocks")] == [7, 7, 0]
    assert more["sequence_index"].tolist() == [[2]] and set(PERF_METRIC_OUTPUTS) < set(more)
    assert [more[n][0, 0] for n in ("arrival_time_ns", "first_token_time_ns", "last_token_time_ns")] == [10, 12, 13]
    assert more["output_ids"].shape == (1, 0)
    totals = Stats(forward_passes=3, drafts=2, draft_tokens=14, accepted_tokens=6, accepted_per_position=[3, 2, 1])
    counted = response_tensors("", [], "length", totals, timing=Timing(10, 11, 12, 13))
    assert [counted[n][0, 0] for n in ("num_forward_passes", "num_draft_tokens", "num_accepted_draft_tokens",
                                       "total_draft_tokens", "total_accepted_draft_tokens")] == [3, 14, 6, 14, 6]
    assert counted["acceptance_rate"][0, 0] == pytest.approx(6 / 14)
    scored = response_tensors("ab", [5, 6], None, None, log_probs=([-0.5, -1.25], -3.0))
    for name, shape in (("cum_log_probs", (1, 1)), ("output_log_probs", (1, 1, 2))):
        assert scored[name].dtype == specs[name].numpy_dtype and scored[name].shape == shape, name
        assert scored[name].ndim == 1 + len(specs[name].dims)  # the declared dims, after the batch dimension
    assert scored["cum_log_probs"].tolist() == [[-3.0]] and scored["output_log_probs"].tolist() == [[[-0.5, -1.25]]]


def test_contract_is_tensorrtllm_backends():
    """Every input and output of tensorrtllm_backend's `ensemble` and `tensorrt_llm_bls` models
    (all_models/inflight_batcher_llm/*/config.pbtxt, as published), with their types and dims."""
    published_inputs = {
        "text_input": ("TYPE_STRING", (1,)), "decoder_text_input": ("TYPE_STRING", (1,)),
        "image_input": ("TYPE_FP16", (-1, 3, -1, -1)), "image_bytes_input": ("TYPE_UINT8", (-1, -1, -1, -1)),
        "image_url_input": ("TYPE_STRING", (1,)), "video_bytes_input": ("TYPE_UINT8", (-1, -1, -1, -1)),
        "max_tokens": ("TYPE_INT32", (1,)), "bad_words": ("TYPE_STRING", (-1,)), "stop_words": ("TYPE_STRING", (-1,)),
        "exclude_input_in_output": ("TYPE_BOOL", (1,)), "end_id": ("TYPE_INT32", (1,)), "pad_id": ("TYPE_INT32", (1,)),
        "top_k": ("TYPE_INT32", (1,)), "top_p": ("TYPE_FP32", (1,)), "temperature": ("TYPE_FP32", (1,)),
        "length_penalty": ("TYPE_FP32", (1,)), "repetition_penalty": ("TYPE_FP32", (1,)),
        "min_tokens": ("TYPE_INT32", (1,)), "presence_penalty": ("TYPE_FP32", (1,)),
        "frequency_penalty": ("TYPE_FP32", (1,)), "seed": ("TYPE_UINT64", (1,)),
        "return_log_probs": ("TYPE_BOOL", (1,)), "return_context_logits": ("TYPE_BOOL", (1,)),
        "return_generation_logits": ("TYPE_BOOL", (1,)), "num_return_sequences": ("TYPE_INT32", (1,)),
        "beam_width": ("TYPE_INT32", (1,)), "stream": ("TYPE_BOOL", (1,)),
        "prompt_embedding_table": ("TYPE_FP16", (-1, -1)), "prompt_vocab_size": ("TYPE_INT32", (1,)),
        "prompt_table_extra_id": ("TYPE_UINT64", (1,)), "embedding_bias_words": ("TYPE_STRING", (-1,)),
        "embedding_bias_weights": ("TYPE_FP32", (-1,)), "return_perf_metrics": ("TYPE_BOOL", (1,)),
        "guided_decoding_guide_type": ("TYPE_STRING", (1,)), "guided_decoding_guide": ("TYPE_STRING", (1,)),
        "use_draft_logits": ("TYPE_BOOL", (1,)), "lora_task_id": ("TYPE_UINT64", (1,)),
        "lora_weights": ("TYPE_FP16", (-1, -1)), "lora_config": ("TYPE_INT32", (-1, 3)),
    }
    published_outputs = {
        "text_output": ("TYPE_STRING", (-1,)), "cum_log_probs": ("TYPE_FP32", (-1,)),
        "output_log_probs": ("TYPE_FP32", (-1, -1)), "batch_index": ("TYPE_INT32", (1,)),
        "sequence_index": ("TYPE_INT32", (1,)), "kv_cache_alloc_new_blocks": ("TYPE_INT32", (1,)),
        "kv_cache_reused_blocks": ("TYPE_INT32", (1,)), "kv_cache_alloc_total_blocks": ("TYPE_INT32", (1,)),
        "arrival_time_ns": ("TYPE_INT64", (1,)), "first_scheduled_time_ns": ("TYPE_INT64", (1,)),
        "first_token_time_ns": ("TYPE_INT64", (1,)), "last_token_time_ns": ("TYPE_INT64", (1,)),
        "acceptance_rate": ("TYPE_FP32", (1,)), "total_accepted_draft_tokens": ("TYPE_INT32", (1,)),
        "total_draft_tokens": ("TYPE_INT32", (1,)),
    }
    ours = {s.name: (s.data_type, s.dims) for s in INPUTS}
    assert {name: ours.get(name) for name in published_inputs} == published_inputs
    assert all(s.optional == (s.name not in ("text_input", "max_tokens")) for s in INPUTS)
    ours = {s.name: (s.data_type, s.dims) for s in OUTPUTS}
    assert {name: ours.get(name) for name in published_outputs} == published_outputs
    assert not {s.name for s in INPUTS} & {s.name for s in OUTPUTS}  # an ensemble needs distinct names


def declared(config_text: str, block: str) -> dict:
    body = config_text.split(f"\n{block} [\n", 1)[1].split("\n]", 1)[0]
    rows = re.findall(r'\{ name: "(\w+)" data_type: (TYPE_\w+) dims: \[ ([-\d, ]+) \]( optional: true)? \}', body)
    return {name: (kind, tuple(int(d) for d in dims.split(",")), bool(optional)) for name, kind, dims, optional in rows}


def test_rendered_configs_declare_exactly_the_contract(tmp_path):
    repo = render_repository(tmp_path / "repo", model_dir="../..")
    want_inputs = {s.name: (s.data_type, s.dims, s.optional) for s in INPUTS}
    want_outputs = {s.name: (s.data_type, s.dims, False) for s in OUTPUTS}
    for model in ("tidar", "ensemble"):
        text = (repo / model / "config.pbtxt").read_text()
        assert declared(text, "input") == want_inputs and declared(text, "output") == want_outputs, model
        assert "max_batch_size: 1\n" in text and (repo / model / "1").is_dir()
    tidar = (repo / "tidar" / "config.pbtxt").read_text()
    assert "decoupled: true" in tidar and 'backend: "python"' in tidar
    ensemble = (repo / "ensemble" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ensemble and 'model_name: "tidar"' in ensemble
    maps = re.findall(r'(input|output)_map \{ key: "(\w+)" value: "(\w+)" \}', ensemble)
    assert all(key == value for _, key, value in maps)
    assert sorted(key for kind, key, _ in maps if kind == "input") == sorted(s.name for s in INPUTS)
    assert sorted(key for kind, key, _ in maps if kind == "output") == sorted(s.name for s in OUTPUTS)
    assert sorted(p.name for p in repo.iterdir()) == ["ensemble", "tensorrt_llm", "tidar"]
    alone = render_repository(tmp_path / "alone", model_dir="../..", ensemble=False, llmapi=False)
    assert sorted(p.name for p in alone.iterdir()) == ["tidar"]


def test_render_fills_every_field_and_options_parse_back(tmp_path):
    repo = render_repository(tmp_path / "repo", model_dir="../..", backend="onnxruntime", draft_len="3",
                             max_batch_size=4, default_timeout=30, instance_kind="KIND_GPU", instance_count=2)
    text = (repo / "tidar" / "config.pbtxt").read_text()
    assert "${" not in text and (repo / "tidar" / "1" / "model.py").is_file()
    assert "count: 2 kind: KIND_GPU" in text
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
    assert set(params) == set(template_fields()) - set(STRUCTURE_FIELDS)
    options = ServingOptions.from_parameters(params)
    assert (options.model_dir, options.backend, options.draft_len, options.max_batch_size) == ("../..", "onnxruntime",
                                                                                            3, 4)
    assert options.default_timeout == 30.0 and options.autotune_batch_sizes == (1, 4, 16)
    assert ServingOptions.from_parameters({"draft_len": "auto", "default_timeout": "0"}).draft_len is None


@pytest.mark.parametrize("options,message", [
    (dict(backend="tensorflow"), "backend must be one of"),
    (dict(instance_kind="KIND_TPU"), "instance_kind must be one of"),
    (dict(draft_len="many"), "serving option 'draft_len' has an invalid value 'many'"),
    (dict(draft_len=-1), "draft_len must be 'auto' or a non-negative integer, got -1"),
    (dict(max_batch_size=0), "max_batch_size must be a positive integer"),
    (dict(model_dir='a"b'), "cannot be written into config.pbtxt"),
])
def test_render_refuses_bad_options_and_writes_nothing(tmp_path, options, message):
    with pytest.raises(RenderError, match=message):
        render_repository(tmp_path / "repo", **{"model_dir": "../..", **options})
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("params,message", [
    ({"max_batch_size": "lots"}, "parameter 'max_batch_size' has an invalid value 'lots'"),
    ({"colour": "blue"}, r"unknown parameter\(s\) \['colour'\]"),
    ({"max_batch_size": "0"}, "max_batch_size must be a positive integer, got 0"),
])
def test_bad_model_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        ServingOptions.from_parameters(params)


def test_serve_refuses_missing_unrendered_and_busy(tmp_path):
    with pytest.raises(ServeError, match="no such model repository"):
        check_repository(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match="not a model repository"):
        check_repository(tmp_path / "empty")
    with pytest.raises(ServeError, match="an unrendered template"):
        check_repository(TEMPLATES)
    repo = render_repository(tmp_path / "repo", model_dir="../..")
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"gRPC port {port} is already in use"):
            TritonServer(repo, grpc_port=port, http_port=0, metrics_port=0)


def test_serve_without_a_server_says_how_to_get_one(monkeypatch):
    import sys

    from tidar.serving.serve import find_tritonserver

    monkeypatch.setitem(sys.modules, "pytriton", None)  # as if nvidia-pytriton were not installed
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ServeError, match=r"no Triton Inference Server found: install the serve extra"):
        find_tritonserver()

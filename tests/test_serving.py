"""The serving pieces that need no server: request parsing (runtime/serving.py), the model's
parameters, repository rendering (export/triton_repo.py) and `tidar serve`'s checks."""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest

from tidar.export.triton_repo import TEMPLATES, RenderError, render_repository, template_fields
from tidar.runtime.config import TiDARConfig
from tidar.runtime.generate import RequestError
from tidar.runtime.serving import INPUTS, OUTPUTS, ServingOptions, parse_request, response_tensors
from tidar.runtime.tokenizer import Tokenizer
from tidar.serve import ServeError, TritonServer, check_repository


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    folder = tiny_checkpoints["qwen2"]
    return Tokenizer(folder), TiDARConfig.from_file(folder)


def inputs(**values):
    arrays = {"text_input": np.array([b"def main():"], dtype=np.object_), "max_tokens": np.array([8], np.int32)}
    for name, value in values.items():
        if value is None:
            arrays.pop(name, None)
        else:
            arrays[name] = value
    return arrays


def parse(model, **values):
    tokenizer, config = model
    return parse_request(inputs(**values), tokenizer, config, max_tokens_limit=100)


def test_parse_defaults_and_every_option(model):
    tokenizer, _ = model
    plain = parse(model)
    assert plain.request.prompt_ids == tokenizer.encode("def main():") and plain.request.max_new_tokens == 8
    assert plain.request.sampling.greedy and plain.stream is False and plain.draft_len is None
    full = parse(model, stream=np.array([True]), temperature=np.array([0.7], np.float32),
                 top_p=np.array([0.9], np.float32), top_k=np.array([5], np.int32),
                 random_seed=np.array([2 ** 63 + 5], np.uint64), stop_words=np.array([b"\n\n", b"#"], np.object_),
                 end_id=np.array([7], np.int32), draft_len=np.array([3], np.int32),
                 timeout=np.array([2.5], np.float32))
    sampling = full.request.sampling
    assert (sampling.temperature, sampling.top_k, sampling.seed) == (pytest.approx(0.7), 5, 2 ** 63 + 5)
    assert full.request.stop == ("\n\n", "#") and full.request.eos_ids == [7]
    assert full.stream and full.draft_len == 3 and full.timeout == 2.5
    assert parse(model, mode=np.array([b"ar"], np.object_)).draft_len == 0


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
    (dict(top_p=np.array([0.0], np.float32)), r"top_p must be in \(0, 1\]"),
    (dict(top_p=np.array([1.5], np.float32)), r"top_p must be in \(0, 1\]"),
    (dict(top_k=np.array([-1], np.int32)), "top_k must be an integer >= 0"),
    (dict(stop_words=np.array([b"ok", b""], np.object_)), "'stop_words' must be non-empty strings"),
    (dict(stop_words=np.array([b"\xc3"], np.object_)), "'stop_words' is not valid UTF-8"),
    (dict(end_id=np.array([99999], np.int32)), "'end_id' must be a token id"),
    (dict(mode=np.array([b"fast"], np.object_)), "'mode' must be one of tidar, ar"),
    (dict(mode=np.array([b"ar"], np.object_), draft_len=np.array([4], np.int32)), "contradicts mode 'ar'"),
    (dict(draft_len=np.array([17], np.int32)), r"'draft_len' must be in \[0, block_size = 16\]"),
    (dict(timeout=np.array([0.0], np.float32)), "'timeout' must be positive seconds"),
    (dict(extra=np.array([1])), r"unknown input\(s\) \['extra'\]"),
])
def test_bad_requests_name_the_input(model, values, message):
    with pytest.raises(RequestError, match=message):
        parse(model, **values)


def test_response_tensors_follow_the_contract():
    tensors = response_tensors("héllo", [5, 6], "stop", None)
    assert set(tensors) == {spec.name for spec in OUTPUTS}
    assert tensors["text_output"][0].decode() == "héllo" and tensors["output_ids"].dtype == np.int32
    assert tensors["finish_reason"][0] == b"stop" and tensors["num_forward_passes"].tolist() == [0]


def test_config_template_declares_exactly_the_contract():
    text = (TEMPLATES / "tidar" / "config.pbtxt").read_text()
    declared = re.findall(r'\{ name: "(\w+)" data_type: (TYPE_\w+) dims: \[ (-?\d+) \]( optional: true)? \}', text)
    inputs_block, outputs_block = text.split("output [")
    want_inputs = {(s.name, s.data_type, str(s.dims[0]), bool(s.optional)) for s in INPUTS}
    want_outputs = {(s.name, s.data_type, str(s.dims[0]), False) for s in OUTPUTS}
    got = {(n, t, d, bool(o)) for n, t, d, o in declared}
    assert got == want_inputs | want_outputs
    assert all(f'"{s.name}"' in inputs_block for s in INPUTS) and all(f'"{s.name}"' in outputs_block for s in OUTPUTS)
    assert "decoupled: true" in text and 'backend: "python"' in text


def test_render_fills_every_field_and_options_parse_back(tmp_path):
    repo = render_repository(tmp_path / "repo", model_dir="../..", backend="onnxruntime", draft_len="3",
                             max_batch_size=4, default_timeout=30, instance_kind="KIND_GPU", instance_count=2)
    text = (repo / "tidar" / "config.pbtxt").read_text()
    assert "${" not in text and (repo / "tidar" / "1" / "model.py").is_file()
    assert "count: 2 kind: KIND_GPU" in text
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
    assert set(params) == {f for f in template_fields() if f not in ("instance_count", "instance_kind")}
    options = ServingOptions.from_parameters(params)
    assert (options.model_dir, options.backend, options.draft_len, options.max_batch_size) == ("../..", "onnxruntime",
                                                                                            3, 4)
    assert options.default_timeout == 30.0 and options.autotune_batch_sizes == (1, 4, 16)
    assert ServingOptions.from_parameters({"draft_len": "auto", "default_timeout": "0"}).draft_len is None


@pytest.mark.parametrize("options,message", [
    (dict(backend="tensorflow"), "backend must be one of"),
    (dict(instance_kind="KIND_TPU"), "instance_kind must be one of"),
    (dict(draft_len="many"), "draft_len must be 'auto'"),
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
    ({"max_batch_size": "0"}, "max_batch_size and autotune_repeats must be >= 1"),
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

    from tidar.serve import find_tritonserver

    monkeypatch.setitem(sys.modules, "pytriton", None)  # as if nvidia-pytriton were not installed
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ServeError, match=r"no Triton Inference Server found: install the serve extra"):
        find_tritonserver()

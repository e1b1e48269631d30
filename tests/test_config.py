"""TiDARConfig: reading, writing and validating config.json.

Round trips (from_file -> to_dict -> save -> from_file) lose nothing for every family and
stay readable by transformers' AutoConfig; the transformers-5 (`rope_parameters`) and 4.x
(`rope_theta` + `rope_scaling`) spellings read identically; every invalid config raises a
ConfigError whose message names the field and the file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tidar.runtime.config import ConfigError, TiDARConfig

FAMILIES = ("qwen2", "qwen3", "llama")  # the families of the conftest fixtures


def read_json(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture
def base(tiny_checkpoints) -> dict:
    """The parsed config.json of the tiny Llama checkpoint (it has RoPE scaling)."""
    return read_json(tiny_checkpoints["llama"])


def write(tmp_path, raw) -> Path:
    path = tmp_path / "config.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, tiny_checkpoints, tmp_path):
    original = read_json(tiny_checkpoints[family])
    config = TiDARConfig.from_file(tiny_checkpoints[family])
    assert config.model_type == family
    assert config.to_dict() == original
    saved = config.save(tmp_path)
    assert saved == tmp_path / "config.json"
    again = TiDARConfig.from_file(saved)  # a file path works as well as a folder
    assert again == config and again.to_dict() == original


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_saved_config(family, tiny_checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = TiDARConfig.from_file(tiny_checkpoints[family])
    config.save(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == family
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "pad_token_id", "bos_token_id"):
        assert getattr(hf, name) == getattr(config, name), name
    assert hf.eos_token_id == config.eos_token_ids[0]
    rope = dict(hf.rope_parameters)
    assert rope.pop("rope_theta") == config.rope_theta
    assert rope == (config.rope_scaling or {"rope_type": "default"})
    assert hf.tidar == config.tidar_block()
    assert {k: hf.tidar[k] for k in ("mask_token_id", "block_size")} == {"mask_token_id": config.mask_token_id,
                                                                         "block_size": config.block_size}


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_config_saved_by_transformers(family, tiny_checkpoints, hf_models, tmp_path):
    """transformers 5 writes `rope_parameters` and `dtype` and many fields of its own."""
    hf_models[family].config.save_pretrained(tmp_path)
    written = read_json(tmp_path)
    assert "rope_parameters" in written and "rope_theta" not in written
    assert TiDARConfig.from_file(tmp_path) == TiDARConfig.from_file(tiny_checkpoints[family])


ROPE_SPELLINGS = {
    "default": (
        {"rope_theta": 10000.0},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    ),
    "linear": (
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}},
    ),
    "linear-legacy-type": (
        {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}},
    ),
    "llama3": (
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 256, "rope_theta": 500000.0}},
    ),
    "default-scaling-null": (
        {"rope_theta": 1000.0, "rope_scaling": None},
        {"rope_parameters": {"rope_theta": 1000.0}},
    ),
}


@pytest.mark.parametrize("case", list(ROPE_SPELLINGS))
def test_rope_spellings_read_identically(case, base):
    v4, v5 = ROPE_SPELLINGS[case]
    stripped = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
    old, new = TiDARConfig.from_dict({**stripped, **v4}), TiDARConfig.from_dict({**stripped, **v5})
    assert old == new
    assert old.rope_theta == (v4["rope_theta"])
    expected_type = None if case.startswith("default") else case.split("-")[0]
    assert (old.rope_scaling or {}).get("rope_type") == expected_type


def test_missing_rope_theta_defaults_to_10000(base):
    raw = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    assert TiDARConfig.from_dict(raw).rope_theta == 10000.0


def test_unknown_fields_survive_round_trip(base, tmp_path):
    raw = {**base, "some_future_field": [1, 2], "tidar": {**base["tidar"], "note": "kept"}}
    config = TiDARConfig.from_file(write(tmp_path, raw))
    assert config.to_dict() == dict(sorted(raw.items()))


def test_qwen3_without_head_dim_uses_transformers_default(tiny_checkpoints, tmp_path):
    """transformers' Qwen3Config defaults head_dim to 128, not hidden_size // heads."""
    transformers = pytest.importorskip("transformers")
    raw = read_json(tiny_checkpoints["qwen3"])
    del raw["head_dim"]
    path = write(tmp_path, raw)
    assert TiDARConfig.from_file(path).head_dim == transformers.AutoConfig.from_pretrained(tmp_path).head_dim == 128


# ---------------------------------------------------------------- errors name the field and the file
def without(*keys):
    def edit(raw):
        for key in keys:
            store = raw
            *parents, last = key.split(".")
            for parent in parents:
                store = store[parent]
            del store[last]
    return edit


def setting(key, value):
    def edit(raw):
        store = raw
        *parents, last = key.split(".")
        for parent in parents:
            store = store[parent]
        store[last] = value
    return edit


BAD_CONFIGS = {
    "no-tidar-block": (without("tidar"), "'tidar'"),
    "tidar-not-object": (setting("tidar", 16), "'tidar'"),
    "missing-hidden_size": (without("hidden_size"), "'hidden_size'"),
    "missing-vocab_size": (without("vocab_size"), "'vocab_size'"),
    "missing-num_hidden_layers": (without("num_hidden_layers"), "'num_hidden_layers'"),
    "missing-mask_token_id": (without("tidar.mask_token_id"), "'tidar.mask_token_id'"),
    "missing-block_size": (without("tidar.block_size"), "'tidar.block_size'"),
    "hidden_size-string": (setting("hidden_size", "64"), "'hidden_size'"),
    "hidden_size-float": (setting("hidden_size", 64.5), "'hidden_size'"),
    "num_layers-bool": (setting("num_hidden_layers", True), "'num_hidden_layers'"),
    "tie-string": (setting("tie_word_embeddings", "yes"), "'tie_word_embeddings'"),
    "eps-string": (setting("rms_norm_eps", "1e-6"), "'rms_norm_eps'"),
    "block_size-string": (setting("tidar.block_size", "16"), "'tidar.block_size'"),
    "unknown-model_type": (setting("model_type", "gpt2"), "'model_type'"),
    "missing-model_type": (without("model_type"), "'model_type'"),
    "mask-negative": (setting("tidar.mask_token_id", -1), "'tidar.mask_token_id'"),
    "mask-equals-vocab": (setting("tidar.mask_token_id", 512), "'tidar.mask_token_id'"),
    "mask-beyond-vocab": (setting("tidar.mask_token_id", 10**6), "'tidar.mask_token_id'"),
    "mask-is-eos": (setting("tidar.mask_token_id", 0), "'tidar.mask_token_id'"),
    "block_size-zero": (setting("tidar.block_size", 0), "'tidar.block_size'"),
    "block_size-negative": (setting("tidar.block_size", -4), "'tidar.block_size'"),
    "kv-heads-not-dividing": (setting("num_key_value_heads", 3), "'num_key_value_heads'"),
    "kv-heads-zero": (setting("num_key_value_heads", 0), "'num_key_value_heads'"),
    "head_dim-odd": (setting("head_dim", 15), "'head_dim'"),
    "hidden-not-divisible-no-head_dim": (lambda raw: (raw.pop("head_dim"), raw.update(hidden_size=66)),
                                         "'hidden_size'"),
    "rope-type-yarn": (setting("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), "'rope_scaling.rope_type'"),
    "rope-params-type-yarn": (lambda raw: (raw.pop("rope_scaling"), raw.pop("rope_theta"), raw.update(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})), "'rope_scaling.rope_type'"),
    "rope-linear-no-factor": (setting("rope_scaling", {"rope_type": "linear"}), "'rope_scaling.factor'"),
    "rope-llama3-missing-key": (without("rope_scaling.low_freq_factor"), "'rope_scaling.low_freq_factor'"),
    "rope-scaling-not-object": (setting("rope_scaling", 8.0), "'rope_scaling'"),
    "rope-params-not-object": (setting("rope_parameters", 8.0), "'rope_parameters'"),
    "rope_theta-negative": (setting("rope_theta", -1.0), "'rope_theta'"),
    "eos-outside-vocab": (setting("eos_token_id", [0, 9999]), "'eos_token_id'"),
    "pad-outside-vocab": (setting("pad_token_id", -3), "'pad_token_id'"),
    "dtype-unknown": (setting("torch_dtype", "int8"), "'torch_dtype'"),
    "hidden_act-gelu": (setting("hidden_act", "gelu"), "'hidden_act'"),
    "mlp_bias": (setting("mlp_bias", True), "'mlp_bias'"),
    "sliding-window": (setting("use_sliding_window", True), "'use_sliding_window'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_invalid_config_error_names_field_and_file(case, base, tmp_path):
    edit, field = BAD_CONFIGS[case]
    raw = copy.deepcopy(base)
    edit(raw)
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as excinfo:
        TiDARConfig.from_file(path)
    message = str(excinfo.value)
    assert field in message and str(path) in message, message


@pytest.mark.parametrize("text", ["{not json", "", "\"a string\"", "[1, 2]", b"\xff\xfe\x00".decode("latin-1")],
                         ids=["syntax", "empty", "string", "list", "binary"])
def test_unreadable_json(text, tmp_path):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        TiDARConfig.from_file(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("target", ["folder", "file"])
def test_missing_file(target, tmp_path):
    path = tmp_path if target == "folder" else tmp_path / "nowhere" / "config.json"
    with pytest.raises(ConfigError, match="no such file") as excinfo:
        TiDARConfig.from_file(path)
    assert "config.json" in str(excinfo.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_from_dict_leaves_its_argument_alone(base):
    snapshot = copy.deepcopy(base)
    assert TiDARConfig.from_dict(base) == TiDARConfig.from_dict(base)
    assert base == snapshot

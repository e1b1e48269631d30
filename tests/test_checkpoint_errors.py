"""Damaged checkpoints: `load_model` and `Tokenizer` refuse them with a clear error.

Each case copies a tiny checkpoint into tmp_path, damages it (missing or corrupt files,
pickle-only weights, truncated or incomplete safetensors, wrong shapes, NaN weights,
config/weights mismatches, an out-of-vocabulary mask id) and expects a `CheckpointError`
(or `TokenizerError`) whose message names the file and, where one is at fault, the tensor
or field — raised directly, not chained onto a library's traceback. The pickle case checks
that the file was never unpickled.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tidar.runtime.checkpoint import CheckpointError, load_model
from tidar.runtime.tokenizer import Tokenizer, TokenizerError

WEIGHTS = "model.safetensors"
EMBED = "model.embed_tokens.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path) -> Path:
    """A private copy of the tiny Llama checkpoint (untied, so every tensor is stored)."""
    return Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "ckpt"))


@pytest.fixture
def tied_ckpt(tiny_checkpoints, tmp_path) -> Path:
    """A private copy of the tiny Qwen2 checkpoint (tied embeddings: no lm_head.weight stored)."""
    return Path(shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "tied"))


def load_error(folder: Path, *fragments: str) -> str:
    """Load `folder`, expect a CheckpointError mentioning every fragment; return the message."""
    with pytest.raises(CheckpointError) as excinfo:
        load_model(folder, dtype="float32")
    error = excinfo.value
    message = str(error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # Raised as our own error, not chained onto a library exception's traceback.
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), message
    return message


def edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("tidar_"):
            raw["tidar"][key[len("tidar_"):]] = value
        else:
            raw[key] = value
    (folder / "config.json").write_text(json.dumps(raw))


def edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / WEIGHTS)
    edit(state)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def shard(folder: Path) -> list[Path]:
    """Split model.safetensors into two shards and an index; return the shard paths."""
    state = load_file(folder / WEIGHTS)
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, shards = {}, []
    for i, part in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        shards.append(folder / file)
    (folder / WEIGHTS).unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, read with safetensors itself."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def assert_holds_the_stored_tensors(folder: Path) -> None:
    """load_model(folder) gives a model whose every parameter and buffer is materialized and whose
    parameters are exactly the stored tensors (a tied LM head is the embedding itself)."""
    stored = stored_tensors(folder)
    model = load_model(folder, dtype="float32")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in (*params.items(), *model.named_buffers()):
        assert not tensor.is_meta, f"{name} was never loaded"
    tied = "lm_head.weight" not in stored
    expected = {**stored, "lm_head.weight": stored[EMBED]} if tied else stored
    assert set(params) == set(expected), sorted(set(params) ^ set(expected))
    for name, tensor in expected.items():
        assert torch.equal(params[name], tensor.float()), name
    assert (params["lm_head.weight"] is params[EMBED]) == tied


def test_undamaged_copy_loads(ckpt, tied_ckpt):
    """The baseline: both copies load, and a hand-sharded copy too, each into a model that holds
    exactly the stored tensors."""
    assert "lm_head.weight" in stored_tensors(ckpt) and "lm_head.weight" not in stored_tensors(tied_ckpt)
    for folder in (ckpt, tied_ckpt):
        assert_holds_the_stored_tensors(folder)
    assert len(shard(ckpt)) == 2
    assert_holds_the_stored_tensors(ckpt)


# ---------------------------------------------------------------- files
def test_not_a_folder(tmp_path):
    load_error(tmp_path / "nowhere", "nowhere", "not a checkpoint folder")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    load_error(ckpt, "config.json", "no such file")


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "\x00\x01binary", "[]"],
                         ids=["truncated", "binary", "list"])
def test_corrupt_config(ckpt, text):
    (ckpt / "config.json").write_text(text)
    load_error(ckpt, str(ckpt / "config.json"))


def test_missing_weights(ckpt):
    (ckpt / WEIGHTS).unlink()
    load_error(ckpt, str(ckpt), "model.safetensors")


class _Trap:
    """Unpickling this opens (creates) `path`: the proof that a file was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoint_is_refused_unopened(ckpt, tmp_path, name):
    # The trap works: unpickling a twin really does create its sentinel.
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Trap(armed))).close()
    assert armed.exists()
    sentinel = tmp_path / "unpickled"
    (ckpt / WEIGHTS).unlink()
    (ckpt / name).write_bytes(pickle.dumps({EMBED: _Trap(sentinel)}))
    load_error(ckpt, name, "pickle", "safetensors")
    assert not sentinel.exists(), "the pickle checkpoint was unpickled"


@pytest.mark.parametrize("keep", ["4 bytes", "header", "half", "all but 1 byte"])
def test_truncated_safetensors(ckpt, keep):
    data = (ckpt / WEIGHTS).read_bytes()
    cut = {"4 bytes": 4, "header": 100, "half": len(data) // 2, "all but 1 byte": len(data) - 1}[keep]
    (ckpt / WEIGHTS).write_bytes(data[:cut])
    load_error(ckpt, str(ckpt / WEIGHTS), "safetensors")


def test_garbage_safetensors(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"\xff" * 64)
    load_error(ckpt, str(ckpt / WEIGHTS))


def test_truncated_shard(ckpt):
    shards = shard(ckpt)
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    load_error(ckpt, str(shards[1]))


def test_index_names_missing_shard(ckpt):
    shards = shard(ckpt)
    shards[0].unlink()
    load_error(ckpt, "model.safetensors.index.json", shards[0].name, "does not exist")


@pytest.mark.parametrize("text", ["{", '{"metadata": {}}', '{"weight_map": [1, 2]}', '{"weight_map": {"a": 3}}'],
                         ids=["truncated", "no-weight_map", "list", "non-string-file"])
def test_corrupt_index(ckpt, text):
    shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(text)
    load_error(ckpt, "model.safetensors.index.json")


def test_index_missing_a_tensor(ckpt):
    shard(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][Q_PROJ]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    load_error(ckpt, "missing tensor", Q_PROJ)


# ---------------------------------------------------------------- tensors
def test_missing_tensor(ckpt):
    edit_weights(ckpt, lambda state: state.pop(Q_PROJ))
    load_error(ckpt, "missing tensor", Q_PROJ)


def test_missing_lm_head_when_untied(ckpt):
    edit_weights(ckpt, lambda state: state.pop("lm_head.weight"))
    load_error(ckpt, "missing tensor", "lm_head.weight")


@pytest.mark.parametrize("name", [Q_PROJ, EMBED, "model.norm.weight"])
def test_wrong_shape(ckpt, name):
    def edit(state):
        state[name] = state[name][..., :-1].contiguous()
    edit_weights(ckpt, edit)
    load_error(ckpt, str(ckpt / WEIGHTS), name, "shape")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights(ckpt, bad):
    def edit(state):
        state[Q_PROJ][3, 5] = bad
    edit_weights(ckpt, edit)
    load_error(ckpt, str(ckpt / WEIGHTS), Q_PROJ, "NaN or Inf")


def test_integer_weights(ckpt):
    def edit(state):
        state[Q_PROJ] = state[Q_PROJ].to(torch.int32)
    edit_weights(ckpt, edit)
    load_error(ckpt, str(ckpt / WEIGHTS), Q_PROJ, "dtype")


# ---------------------------------------------------------------- config vs weights
def test_config_has_more_layers_than_weights(ckpt):
    edit_config(ckpt, num_hidden_layers=3)
    load_error(ckpt, "missing tensor", "model.layers.2.")


def test_config_has_fewer_layers_than_weights(ckpt):
    edit_config(ckpt, num_hidden_layers=1)
    load_error(ckpt, str(ckpt / WEIGHTS), "model.layers.1.", "disagree")


def test_config_width_differs_from_weights(ckpt):
    edit_config(ckpt, intermediate_size=96)
    load_error(ckpt, str(ckpt / WEIGHTS), "mlp", "shape")


def test_config_vocab_differs_from_weights(ckpt):
    edit_config(ckpt, vocab_size=600)
    load_error(ckpt, str(ckpt / WEIGHTS), EMBED, "shape")


def test_untied_weights_with_tied_config_are_missing_embedding(ckpt):
    """Tied config, but the file holds lm_head only: the embedding is what is missing."""
    edit_weights(ckpt, lambda state: state.pop(EMBED))
    edit_config(ckpt, tie_word_embeddings=True)
    load_error(ckpt, "missing tensor", EMBED)


def test_tied_config_ignores_a_stored_lm_head(tied_ckpt):
    """As in transformers, a tied model may still carry lm_head.weight; it is not an error."""
    edit_weights(tied_ckpt, lambda state: state.__setitem__("lm_head.weight", state[EMBED].clone()))
    model = load_model(tied_ckpt, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_qwen2_bias_missing(tied_ckpt):
    edit_weights(tied_ckpt, lambda state: state.pop("model.layers.0.self_attn.k_proj.bias"))
    load_error(tied_ckpt, "missing tensor", "model.layers.0.self_attn.k_proj.bias")


@pytest.mark.parametrize("mask_id", [-1, 512, 10**6])
def test_mask_id_outside_vocab(ckpt, mask_id):
    edit_config(ckpt, tidar_mask_token_id=mask_id)
    load_error(ckpt, "config.json", "mask_token_id", str(mask_id))


def test_plain_ar_checkpoint_without_tidar_block(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["tidar"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    load_error(ckpt, "config.json", "'tidar'")


def test_unknown_dtype_argument(ckpt):
    with pytest.raises(CheckpointError, match="int8"):
        load_model(ckpt, dtype="int8")


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_loads(ckpt):
    tokenizer = Tokenizer(ckpt)
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json") as excinfo:
        Tokenizer(ckpt)
    assert str(ckpt) in str(excinfo.value)


@pytest.mark.parametrize("text", ["{", '{"model": 3}', ""], ids=["truncated", "wrong-schema", "empty"])
def test_corrupt_tokenizer(ckpt, text):
    (ckpt / "tokenizer.json").write_text(text)
    with pytest.raises(TokenizerError) as excinfo:
        Tokenizer(ckpt)
    assert str(ckpt / "tokenizer.json") in str(excinfo.value)
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


@pytest.mark.parametrize("text", ["{", "[1]"], ids=["truncated", "list"])
def test_corrupt_tokenizer_config(ckpt, text):
    (ckpt / "tokenizer_config.json").write_text(text)
    with pytest.raises(TokenizerError) as excinfo:
        Tokenizer(ckpt)
    assert str(ckpt / "tokenizer_config.json") in str(excinfo.value)

"""The released TiDAR-LM layout, as downloaded (tests/released_checkpoint.py builds it at toy size).

- The TiDAR fields resolve with no flag: [MASK] = the tokenizer's <|fim_pad|>, block size 16,
  trained block sizes [16], each with its source; --mask-token-id / --block-size (the loaders'
  mask_token_id= / block_size=) supply or override them; a tokenizer without <|fim_pad|> and a
  plain AR checkpoint are refused with messages that name the token and the flags.
- Greedy output equals transformers' Qwen3ForCausalLM in fp32 (an argmax loop over its logits):
  AR, TiDAR at the trained b = 16, and k-of-b; also for a prompt holding <|fim_pad|>.
- generation_config.json: an end id listed only there stops `tidar generate`, the export on ONNX
  Runtime and the served model where transformers' own `generate` stops; its sampling defaults
  apply where a request leaves a parameter unset (seeded runs compared), explicit greedy stays.
- `tidar-export build --engine skip` records the resolved fields in OUT/config.json and
  manifest.json; `tidar-export verify` passes with no flag; the real tritonserver serves OUT's
  rendered repository.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import GenerationConfig, Qwen3ForCausalLM

from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.checkpoint import CheckpointError, load_model
from tidar.runtime.config import ConfigError, TiDARConfig
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.generation_config import GenerationConfigError, GenerationDefaults
from tidar.runtime.sampling import SamplingParams
from tidar.runtime.tokenizer import Tokenizer
from tidar.serving.client import request
from tidar.serving.serve import TritonServer

from released_checkpoint import MASK_TOKEN, token_ids, write_released_checkpoint

PROMPT = "def parse(self, text):\n    "
FIM_PROMPT = "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|><|fim_pad|>"
NEW_TOKENS = 24
STOP_AT = 7
"""The end id listed only in generation_config.json is the greedy continuation's token at this
position (its first occurrence), so generation stops after STOP_AT tokens."""


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """The oracle: argmax of transformers' logits, one token at a time, no end id."""
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(ids):]


def tidar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidar.cli", *args], capture_output=True, text=True)


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidar.export.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(checkpoint folder, transformers model, the greedy oracle's tokens of PROMPT, the end id
    generation_config.json lists beyond Qwen's two)."""
    folder = write_released_checkpoint(tmp_path_factory.mktemp("released") / "TiDAR-tiny")
    hf = Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = Tokenizer(folder).encode(PROMPT)
    greedy = hf_greedy(hf, ids, NEW_TOKENS)
    special = token_ids(folder)
    stop = greedy[STOP_AT - 1]
    assert stop not in greedy[:STOP_AT - 1], "the chosen end id must first occur at STOP_AT"
    assert stop not in (special["<|im_end|>"], special["<|endoftext|>"], special[MASK_TOKEN])
    config_json = json.loads((folder / "config.json").read_text())
    assert "tidar" not in config_json and config_json["eos_token_id"] != stop  # only generation_config has it
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"].append(stop)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder, hf, greedy, stop


@pytest.fixture(scope="module")
def exported(released, tmp_path_factory):
    folder = released[0]
    out = tmp_path_factory.mktemp("export") / "out"
    result = export_cli("build", str(folder), "-o", str(out), "--engine", "skip", "--quiet")
    assert result.returncode == 0, result.stderr
    return out


# ---------------------------------------------------------------- the fields resolve
def test_fields_resolve_from_the_released_layout(released):
    folder = released[0]
    config = TiDARConfig.from_file(folder)
    assert config.mask_token_id == token_ids(folder)[MASK_TOKEN] == Tokenizer(folder).token_to_id("<|fim_pad|>")
    assert (config.block_size, config.trained_block_sizes) == (16, (16,))
    assert config.resolved_sources() == {"mask_token_id": "inferred from <|fim_pad|>",
                                         "block_size": "default of the released layout"}
    block = config.to_dict()["tidar"]
    assert TiDARConfig.from_dict(config.to_dict()) == config  # written back, read back with no tokenizer
    assert block["trained_block_sizes"] == [16] and block["sources"] == config.resolved_sources()


def test_the_qwen2_based_small_architecture_is_recognised(released):
    folder = released[0]
    raw = json.loads((folder / "config.json").read_text())
    raw.update(architectures=["TiDARSmallForCausalLM"], model_type="qwen2")
    config = TiDARConfig.from_dict(raw, tokenizer_folder=folder)
    assert (config.model_type, config.mask_token_id, config.block_size) == \
        ("qwen2", token_ids(folder)[MASK_TOKEN], 16)


def test_overrides_supply_and_override_the_fields(released, tiny_checkpoints):
    folder = released[0]
    config = TiDARConfig.from_file(folder, mask_token_id=5, block_size=8)
    assert (config.mask_token_id, config.block_size, config.trained_block_sizes) == (5, 8, (8,))
    assert config.resolved_sources() == {"mask_token_id": "command line", "block_size": "command line"}
    model = load_model(folder, dtype="float32", block_size=4)
    assert model.config.block_size == 4 and model.config.resolved_sources()["block_size"] == "command line"
    bundled_style = TiDARConfig.from_file(tiny_checkpoints["qwen3"], mask_token_id=7)  # a tidar-block checkpoint
    assert bundled_style.mask_token_id == 7 and bundled_style.resolved_sources() == {
        "mask_token_id": "command line", "block_size": "config"}


def test_a_tokenizer_without_fim_pad_is_refused_by_name(tmp_path):
    folder = write_released_checkpoint(tmp_path / "no-fim-pad", with_fim_pad=False)
    with pytest.raises(CheckpointError, match=r"has no <\|fim_pad\|> token.*--mask-token-id"):
        load_model(folder)
    assert load_model(folder, mask_token_id=3).config.mask_token_id == 3  # the flag supplies it
    result = tidar("generate", str(folder), "--prompt", "x", "--max-new-tokens", "2")
    assert result.returncode == 2 and "<|fim_pad|>" in result.stderr and "--mask-token-id" in result.stderr


def test_a_plain_ar_checkpoint_is_refused_naming_the_flags(tmp_path):
    folder = write_released_checkpoint(tmp_path / "plain", architecture="Qwen3ForCausalLM")
    with pytest.raises(ConfigError) as refused:
        TiDARConfig.from_file(folder)
    message = str(refused.value)
    assert "plain AR checkpoint" in message and "--mask-token-id and --block-size" in message
    assert str(folder / "config.json") in message and "missing: mask_token_id, block_size" in message
    with pytest.raises(ConfigError, match="missing: block_size"):
        TiDARConfig.from_file(folder, mask_token_id=3)
    config = TiDARConfig.from_file(folder, mask_token_id=3, block_size=4)  # both flags: a TiDAR model
    assert (config.mask_token_id, config.block_size) == (3, 4)
    result = export_cli("build", str(folder), "-o", str(tmp_path / "out"), "--engine", "skip", "-q")
    assert result.returncode == 2 and "--mask-token-id and --block-size" in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- lossless against transformers
@pytest.mark.parametrize("shape", [(0, None), (16, None), (16, 2)], ids=["AR", "b16", "b16-k2"])
def test_greedy_equals_transformers(released, shape):
    folder, _, greedy, _ = released
    tokenizer = Tokenizer(folder)
    engine = DecodeEngine(TorchBackend.load(folder, dtype="float32"), tokenizer, draft_len=shape[0],
                          draft_blocks=shape[1])
    result = engine.generate([Request(tokenizer.encode(PROMPT), NEW_TOKENS, eos_ids=())])[0]
    assert result.token_ids == greedy


def test_a_prompt_holding_the_mask_token_is_an_ordinary_input(released):
    """<|fim_pad|> of a FIM prompt is [MASK]'s id: the runtime decodes it as the causal token it is
    (masks are the slots the layout places), with transformers' output."""
    folder, hf, _, _ = released
    tokenizer = Tokenizer(folder)
    ids = tokenizer.encode(FIM_PROMPT)
    assert TiDARConfig.from_file(folder).mask_token_id in ids
    expected = hf_greedy(hf, ids, NEW_TOKENS)
    engine = DecodeEngine(TorchBackend.load(folder, dtype="float32"), tokenizer, draft_len=16)
    assert engine.generate([Request(ids, NEW_TOKENS, eos_ids=())])[0].token_ids == expected


# ---------------------------------------------------------------- generation_config.json
def test_generation_config_end_ids_stop_where_transformers_stops(released):
    folder, hf, greedy, stop = released
    ids = Tokenizer(folder).encode(PROMPT)
    generation = GenerationConfig.from_pretrained(folder)  # the file as the fixture left it
    theirs = hf.generate(torch.tensor([ids]), generation_config=generation, do_sample=False,
                         max_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
    assert theirs == greedy[:STOP_AT]  # transformers stops on the same list
    result = tidar("generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS),
                   "--temperature", "0", "--draft-len", "16", "--dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["token_ids"] == greedy[:STOP_AT] and output["finish_reason"] == "stop"
    assert output["token_ids"][-1] == stop


def test_sampling_defaults_apply_where_unset(released):
    folder, _, greedy, _ = released
    common = ["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", str(STOP_AT - 1), "--mode", "ar",
              "--dtype", "float32", "--seed", "3", "--json"]
    runs = {name: json.loads(tidar(*common, *flags).stdout)["token_ids"] for name, flags in (
        ("defaults", []), ("explicit", ["--temperature", "0.6", "--top-k", "20", "--top-p", "0.95"]),
        ("greedy", ["--temperature", "0"]))}
    assert runs["defaults"] == runs["explicit"] != runs["greedy"] == greedy[:STOP_AT - 1]
    defaults = GenerationDefaults.from_folder(folder)
    assert defaults.sampling == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    chosen = defaults.apply(SamplingParams(temperature=0.0, top_k=3), explicitly_set={"temperature", "top_k"})
    assert (chosen.temperature, chosen.top_k, chosen.top_p) == (0.0, 3, 0.95)  # set ones win, the rest default
    assert defaults.apply({"temperature": None, "top_p": 0.5}) == {"temperature": 0.6, "top_p": 0.5, "top_k": 20}


def test_a_bad_generation_config_is_refused_by_name(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, "x"], "temperature": 0.6}))
    with pytest.raises(GenerationConfigError, match="generation_config.json: field 'eos_token_id'"):
        GenerationDefaults.from_folder(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(GenerationConfigError, match="field 'top_p' must be in"):
        GenerationDefaults.from_folder(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "do_sample": False}))
    assert GenerationDefaults.from_folder(tmp_path).sampling == {"temperature": 0.0}  # as transformers reads it


# ---------------------------------------------------------------- export, verify, serve
def test_export_records_the_resolved_fields(released, exported):
    folder = released[0]
    tidar_block = json.loads((exported / "config.json").read_text())["tidar"]
    expected = {"mask_token_id": token_ids(folder)[MASK_TOKEN], "block_size": 16, "trained_block_sizes": [16],
                "sources": {"mask_token_id": "inferred from <|fim_pad|>", "block_size": "default of the released layout"}}
    assert tidar_block == expected
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["tidar"] == expected and "generation_config.json" in manifest["inputs"]["sha256"]
    assert (exported / "generation_config.json").read_text() == (folder / "generation_config.json").read_text()
    assert TiDARConfig.from_file(exported).resolved_sources() == {"mask_token_id": "config", "block_size": "config"}


def test_the_export_generates_and_verifies_with_no_flag(released, exported):
    _, _, greedy, _ = released
    result = tidar("generate", str(exported), "--backend", "onnxruntime", "--prompt", PROMPT, "--max-new-tokens",
                   str(NEW_TOKENS), "--temperature", "0", "--draft-len", "16", "--draft-blocks", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == greedy[:STOP_AT]
    verified = export_cli("verify", str(exported), "--threads", "1")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "identical greedy tokens at draft shapes b=0, b=16, b=16,k=4" in verified.stdout


def test_the_rendered_repository_serves_it(released, exported):
    _, _, greedy, stop = released
    server = TritonServer(exported / "triton_repo", grpc_port=0, http_port=0, metrics_port=0).start()
    try:
        answer = request(server.grpc_url, PROMPT, NEW_TOKENS, temperature=0.0)
        assert answer.token_ids == greedy[:STOP_AT] and answer.token_ids[-1] == stop
        assert answer.finish_reason == "stop"
        # unset sampling inputs take generation_config.json's defaults: as if sent explicitly
        unset = request(server.grpc_url, PROMPT, STOP_AT - 1, seed=3)
        explicit = request(server.grpc_url, PROMPT, STOP_AT - 1, seed=3, temperature=0.6, top_k=20, top_p=0.95)
        assert unset.token_ids == explicit.token_ids != greedy[:STOP_AT - 1]
    finally:
        status = server.stop()
    assert status == 0, f"tritonserver did not stop cleanly (status {status}); its log: {server.log_file}"

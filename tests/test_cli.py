"""The `tidar` command line: the `generate --json` contract, AR parity through the CLI, `init`,
and bad input (each a one-line error naming the problem, exit status 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tidar.cli import main
from tidar.runtime.generate import DecodeEngine, Request, RequestError

JSON_FIELDS = {"text", "token_ids", "prompt_token_ids", "forward_passes", "tokens_per_forward",
               "tokens_per_second", "mode", "backend", "draft_len"}


def run_json(capsys, *args) -> dict:
    assert main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_contract_and_ar_parity(tiny_checkpoints, capsys):
    path = tiny_checkpoints["qwen2"]
    tidar = run_json(capsys, path, "--prompt", "def main():", "--max-new-tokens", 24, "--draft-len", 4)
    ar = run_json(capsys, path, "--prompt", "def main():", "--max-new-tokens", 24, "--mode", "ar")
    assert JSON_FIELDS <= tidar.keys()
    assert (tidar["mode"], tidar["draft_len"], tidar["backend"], tidar["drafter"]) == ("tidar", 4, "torch", "hybrid")
    assert (ar["mode"], ar["draft_len"], ar["drafter"]) == ("ar", 0, "tidar")  # AR drafts nothing
    alone = run_json(capsys, path, "--prompt", "def main():", "--max-new-tokens", 24, "--draft-len", 4,
                     "--drafter", "tidar")
    assert alone["drafter"] == "tidar" and alone["token_ids"] == tidar["token_ids"]
    assert tidar["token_ids"] == ar["token_ids"]  # greedy TiDAR is lossless
    k_of_b = run_json(capsys, path, "--prompt", "def main():", "--max-new-tokens", 24, "--draft-len", 4,
                      "--draft-blocks", 1)
    assert (k_of_b["draft_len"], k_of_b["draft_blocks"], tidar["draft_blocks"]) == (4, 1, 4)
    assert k_of_b["token_ids"] == ar["token_ids"]
    assert tidar["prompt_token_ids"] == ar["prompt_token_ids"] and tidar["prompt_token_ids"]
    assert ar["forward_passes"] == len(ar["token_ids"])  # AR: one token per forward, prefill included
    assert tidar["tokens_per_forward"] == pytest.approx(len(tidar["token_ids"]) / tidar["forward_passes"], abs=1e-3)
    assert len(tidar["token_ids"]) <= 24


def test_generate_streams_text_and_stats(tiny_checkpoints, capsys):
    assert main(["generate", str(tiny_checkpoints["llama"]), "--prompt", "import os", "--max-new-tokens", "8",
                 "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50", "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert "8 tokens" in out.err and "forwards" in out.err and "finish: length" in out.err


def test_sampling_is_reproducible_from_the_seed(tiny_checkpoints, capsys):
    args = (tiny_checkpoints["qwen3"], "--prompt", "for i in", "--max-new-tokens", 16, "--temperature", 1.0,
            "--draft-len", 8)
    first = run_json(capsys, *args, "--seed", 7)
    again = run_json(capsys, *args, "--seed", 7)
    other = run_json(capsys, *args, "--seed", 8)
    assert first["token_ids"] == again["token_ids"] != other["token_ids"]


@pytest.mark.parametrize("args, message", [
    (["--draft-len", "17"], "--draft-len"),
    (["--draft-len", "many"], "--draft-len"),
    (["--draft-len", "-1"], "--draft-len"),
    (["--draft-len", "0"], "--draft-len"),
    (["--mode", "ar", "--draft-len", "4"], "--draft-len"),
    (["--draft-len", "4", "--draft-blocks", "5"], "--draft-blocks"),
    (["--draft-len", "4", "--draft-blocks", "0"], "--draft-blocks"),
    (["--draft-blocks", "2"], "--draft-blocks"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-2"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--dtype", "float32", "--beta", "1.5"], "beta"),
])
def test_bad_generate_options(tiny_checkpoints, capsys, args, message):
    assert main(["generate", str(tiny_checkpoints["qwen2"]), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tidar generate: error:") and message in err and "Traceback" not in err


def test_empty_and_too_long_prompts(tiny_checkpoints, capsys):
    path = str(tiny_checkpoints["qwen2"])
    assert main(["generate", path, "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", path, "--prompt", "x = 1\n" * 600]) == 2
    err = capsys.readouterr().err
    assert "too long" in err and "max_position_embeddings = 1024" in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_engine_rejects_bad_requests_before_touching_the_batch(tiny_backends):
    backend = tiny_backends["qwen2"]
    engine = DecodeEngine(backend, draft_len=4)
    vocab = backend.config.vocab_size
    bad = {
        "prompt is empty": Request([], 4),
        "outside the vocabulary": Request([5, vocab], 4),
        # a prompt holding the mask id is valid: an ordinary causal token (docs/design.md §1.1)
        "too long": Request([5] * backend.config.max_position_embeddings, 4),
        "max_new_tokens": Request([5], -3),
        "stop strings need a tokenizer": Request([5], 4, stop=("x",)),
    }
    for message, request in bad.items():
        with pytest.raises(RequestError, match=message):
            engine.add([Request([5, 6], 4), request])  # the valid request must not be admitted either
        assert not engine.rows and (engine.cache is None or engine.cache.batch == 0)


def test_init_refuses_a_non_empty_folder_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init", str(out), "--family", "qwen3", "--block-size", "4", "--seed", "1"]) == 0
    capsys.readouterr()
    result = run_json(capsys, out, "--prompt", "x", "--max-new-tokens", 5, "--draft-len", 4)
    assert result["draft_len"] == 4 and len(result["token_ids"]) == 5
    auto = run_json(capsys, out, "--prompt", "x", "--max-new-tokens", 5)  # draft length chosen by measurement
    assert 0 <= auto["draft_len"] <= 4 and auto["token_ids"] == result["token_ids"]
    assert main(["init", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_console_script_runs_as_a_process(tiny_checkpoints):
    """The installed entry point, end to end in a fresh interpreter (no traceback on errors)."""
    proc = subprocess.run([sys.executable, "-m", "tidar.cli", "generate", str(tiny_checkpoints["qwen2"]),
                           "--prompt", "x", "--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "top_p" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["export-build"]])
@pytest.mark.parametrize("option,value,message", [("--mask-token-id", "-1", "expected a non-negative integer, got -1"),
                                                  ("--block-size", "x", "expected an integer, got 'x'")])
def test_layout_overrides_are_refused_by_name_on_both_commands(command, option, value, message, capsys):
    """--mask-token-id / --block-size have one definition (runtime.config.add_layout_options) for
    `tidar generate` and `tidar-export build`: a bad value exits 2 naming the option, before any work."""
    from tidar.export.cli import main as export_main

    run = (lambda args: export_main(["build", "-o", "unused", *args])) if command == ["export-build"] else \
        (lambda args: main([*command, *args]))
    with pytest.raises(SystemExit) as exit_info:
        run([option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err

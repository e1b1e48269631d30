"""`tidar-export build` and `verify` (export/build.py, export/verify.py, export/cli.py), through the CLI.

One export of the tiny Qwen2 checkpoint at tp 2 is shared by the module (ONNX export is the slow
part). Checked: the OUT layout and manifest fields; both ONNX graphs read their weights from one
shared external-data file holding the checkpoint's values; build_engine.sh names the installed
TensorRT-LLM model file; `verify` passes, and fails naming the artifact when a rank file or an
ONNX graph is tampered with; `tidar generate OUT --backend onnxruntime` gives the torch backend's
tokens on the source; --engine require fails and leaves nothing; an existing OUT is refused (and
kept) without --force and replaced with it; damaged checkpoints are refused with exit status 2,
one line naming the problem, and nothing left behind.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tidar.cli import main as tidar_main
from tidar.export.build import engine_unavailable_reason, tensorrt_unavailable_reason
from tidar.export.cli import main


# the builds here test what surrounds the ONNX step: its output is reused (conftest)
pytestmark = pytest.mark.usefixtures("reused_onnx_export")

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
WEIGHTS = "model.safetensors"
TP = 2


def build_cli(capsys, checkpoint, out, *options) -> tuple[int, str, str]:
    status = main(["build", str(checkpoint), "-o", str(out), "-q", *map(str, options)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def verify_cli(capsys, out) -> tuple[int, str, str]:
    status = main(["verify", str(out), "--threads", "1"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("tidar-export build: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    """Entries of `parent` other than `keep`: an OUT or a .OUT.partial-* folder left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory):
    """(OUT, manifest) of the tiny Qwen2 checkpoint exported at tp 2 (built once)."""
    out = tmp_path_factory.mktemp("export") / "out"
    assert main(["build", str(tiny_checkpoints["qwen2"]), "-o", str(out), "--tp", str(TP), "-q"]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_layout_and_manifest(exported, tiny_checkpoints):
    out, manifest = exported
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["config.json", "manifest.json", "onnx/decode_step.onnx", "onnx/decode_step.weights",
                     "onnx/decode_step_plugin.onnx", "onnx/lm_head.onnx",
                     "tokenizer.json", "tokenizer_config.json", "triton_repo/ensemble/config.pbtxt",
                     "triton_repo/tensorrt_llm/1/model.py", "triton_repo/tensorrt_llm/config.pbtxt",
                     "triton_repo/tidar/1/model.py",
                     "triton_repo/tidar/config.pbtxt", "trtllm/build_engine.sh", "trtllm/config.json",
                     "trtllm/rank0.safetensors", "trtllm/rank1.safetensors"]
    assert not [p.name for p in out.parent.iterdir() if p.name != "out"]  # no temporary folder left
    source = tiny_checkpoints["qwen2"]
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert manifest["inputs"]["checkpoint"] == str(source)
    assert set(manifest["inputs"]["sha256"]) >= {"config.json", WEIGHTS, "tokenizer.json"}
    assert manifest["options"] == {"tp": TP, "dtype": "float32", "draft_len": 16, "draft_blocks": None,
                                   "engine": "auto", "onnx_dtype": "float32",
                                   "mask_token_id": None, "block_size": None}
    assert {"python", "torch", "safetensors", "onnx", "onnxruntime", "onnxscript"} <= manifest["versions"].keys()
    assert manifest["config"]["model_type"] == "qwen2" and manifest["config"]["block_size"] == 16
    assert manifest["config"]["mask_token_id"] == 2 and manifest["config"]["num_hidden_layers"] == 2
    assert sorted(a["path"] for a in manifest["artifacts"]) == [f for f in files if f != "manifest.json"]
    assert all(a["size"] == (out / a["path"]).stat().st_size and len(a["sha256"]) == 64
               for a in manifest["artifacts"])
    skipped = {entry["step"]: entry["reason"] for entry in manifest["skipped"]}
    assert "triton_repo" not in skipped and manifest["triton_repo"]["backend"] == "onnxruntime"
    assert 'key: "backend" value: { string_value: "onnxruntime" }' in (out / "triton_repo/tidar/config.pbtxt").read_text()
    reason = engine_unavailable_reason()
    if reason:  # no TensorRT-LLM here: the engine step is skipped with the reason
        assert skipped["engine"] == reason and not (out / "engine").exists()
    reason = tensorrt_unavailable_reason()
    if reason:  # no TensorRT (or no GPU) here: likewise for the TensorRT engine of the plugin graph
        assert skipped["tensorrt"] == reason and not (out / "tensorrt").exists()
        assert manifest["engines"] == {}
    script = (out / "trtllm" / "build_engine.sh").read_text()
    for flag in ("trtllm-build", "--checkpoint_dir trtllm", "--output_dir engine", "--model_cls_file",
                 "--model_cls_name TiDARForCausalLM", "--max_batch_size", "--max_input_len", "--max_seq_len",
                 "--max_num_tokens", "--max_draft_len 16"):
        assert flag in script
    assert "--workers" not in script  # spawned workers cannot import the --model_cls_file model class
    assert 'MODEL_CLS_FILE="$TIDAR_ROOT/export/trtllm_model.py"' in script and "NOTE" not in script


def test_engine_script_names_the_installed_model_file(exported, tmp_path):
    """build_engine.sh resolves the model file from the installed tidar package, and that file
    exists (the script's own check, run with trtllm-build replaced by a stub that prints its
    arguments)."""
    import subprocess
    import sys

    import tidar

    stub = tmp_path / "bin" / "trtllm-build"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "$@"\n')
    stub.chmod(0o755)
    python = tmp_path / "bin" / "python3"  # this interpreter (with tidar installed) as the script's python3
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin"}
    result = subprocess.run(["bash", str(exported[0] / "trtllm" / "build_engine.sh")], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    model_file = Path(tidar.__file__).resolve().parent / "export" / "trtllm_model.py"
    assert f"--model_cls_file {model_file} --model_cls_name TiDARForCausalLM" in result.stdout
    assert model_file.is_file()


def test_onnx_graphs_share_one_weights_file(exported, tiny_checkpoints):
    """Both step graphs read every weight from onnx/decode_step.weights, at the same offsets, and
    the file holds each checkpoint tensor once (float32), as the checkpoint stores it; the LM-head
    graph's one weight is the embedding's bytes there (the tiny qwen2 ties them)."""
    import numpy as np
    import onnx

    out = exported[0]
    locations = []
    for graph_file in ("decode_step.onnx", "decode_step_plugin.onnx"):
        graph = onnx.load(out / "onnx" / graph_file, load_external_data=False)
        external = {t.name: {e.key: e.value for e in t.external_data} for t in graph.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {entry["location"] for entry in external.values()} == {"decode_step.weights"}
        locations.append(external)
    assert locations[0] == locations[1]
    head = onnx.load(out / "onnx" / "lm_head.onnx", load_external_data=False).graph
    (weight,) = head.initializer
    assert {e.key: e.value for e in weight.external_data} == locations[0]["model.embed_tokens.weight"]
    assert [o.name for o in head.output] == ["logits"] and head.output[0].type.tensor_type.elem_type == 1  # float32
    source = load_file(str(tiny_checkpoints["qwen2"] / WEIGHTS))
    assert len(locations[0]) == len(source)  # the tied LM head is the embedding, stored once
    data = (out / "onnx" / "decode_step.weights").read_bytes()
    entry = locations[0][Q_PROJ]
    offset, length = int(entry["offset"]), int(entry["length"])
    stored = np.frombuffer(data[offset:offset + length], dtype=np.float32).reshape(source[Q_PROJ].shape)
    assert np.array_equal(stored, source[Q_PROJ].float().numpy())


def test_verify_passes(exported, capsys):
    status, out, err = verify_cli(capsys, exported[0])
    assert status == 0, out + err
    lines = {line.split()[1].rstrip(":"): line.split()[0] for line in out.splitlines()}
    assert lines["trtllm"] == lines["onnx:standard"] == lines["onnx:plugin"] == lines["source"] == "ok"
    assert lines["triton_repo"] == "ok"
    if tensorrt_unavailable_reason():
        assert lines["tensorrt"] == "skipped"
    # AR, every trained b (the random-weight checkpoint declares 1..16), and k-of-b
    shapes = ", ".join(["b=0", *(f"b={b}" for b in range(1, 17)), "b=16,k=4"])
    assert f"identical greedy tokens at draft shapes {shapes}" in out


def _tamper_rank(path: Path) -> None:
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    save_file(state, str(path), metadata={"format": "pt"})


def _tamper_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # a weight byte in the middle of the graph file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("artifact, tamper", [("trtllm/rank1.safetensors", _tamper_rank),
                                              ("onnx/decode_step.onnx", _tamper_bytes)], ids=["rank", "onnx"])
def test_verify_fails_on_a_tampered_artifact(exported, tmp_path, capsys, artifact, tamper):
    out = Path(shutil.copytree(exported[0], tmp_path / "out"))
    tamper(out / artifact)
    status, stdout, err = verify_cli(capsys, out)
    assert status == 1
    assert f"failed   artifact:{artifact}: sha256 differs" in stdout
    assert "FAILED" in err and f"artifact:{artifact}" in err
    if artifact.startswith("trtllm"):
        assert "failed   trtllm: " in stdout  # the reassembled weights are no longer the source's


def test_generate_from_out_with_onnxruntime(exported, tiny_checkpoints, capsys):
    args = ["--prompt", "def main():", "--max-new-tokens", "16", "--draft-len", "4", "--json"]
    assert tidar_main(["generate", str(exported[0]), "--backend", "onnxruntime", *args]) == 0
    onnx_result = json.loads(capsys.readouterr().out)
    assert tidar_main(["generate", str(tiny_checkpoints["qwen2"]), *args]) == 0
    torch_result = json.loads(capsys.readouterr().out)
    assert onnx_result["backend"] == "onnxruntime" and onnx_result["token_ids"]
    assert onnx_result["token_ids"] == torch_result["token_ids"]


def test_engine_require_fails_and_leaves_nothing(tiny_checkpoints, tmp_path, capsys):
    reason = engine_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT-LLM is available here: --engine require would build an engine")
    status, _, err = build_cli(capsys, tiny_checkpoints["qwen2"], tmp_path / "out", "--engine", "require")
    assert status == 2
    assert_one_line_error(err, "engine", reason)
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("mode", ["auto", "require"])
def test_a_failing_engine_build_is_a_skip_under_auto_and_an_error_under_require(tiny_checkpoints, tmp_path,
                                                                                 monkeypatch, capsys, mode):
    """Where the engine looks buildable but its build fails (as TensorRT-LLM's graph rewriting did
    on the plugin layer), `auto` still exports everything else and records why; `require` stops
    and leaves nothing. Stands in for the GPU build only."""
    from tidar.export import build as build_module

    def failing_build(folder, *_args):
        (folder / "engine").mkdir()
        (folder / "engine" / "rank0.engine").write_bytes(b"half-written")
        raise build_module.ExportError("TensorRT-LLM engine build failed for rank 0: NotImplementedError: "
                                       "Unknown layer type: LayerType.PLUGIN_V3")

    # the TensorRT-LLM engine step runs first; under require nothing may be missing up front
    reasons = {"engine": None, "tensorrt": None if mode == "require" else "not requested"}
    monkeypatch.setattr(build_module, "engine_skip_reasons", lambda engine: reasons)
    monkeypatch.setattr(build_module, "build_trtllm_engine", failing_build)
    out = tmp_path / "out"
    status, _, err = build_cli(capsys, tiny_checkpoints["qwen2"], out, "--engine", mode)
    if mode == "require":
        assert status == 2
        assert_one_line_error(err, "Unknown layer type")
        assert leftovers(tmp_path, set()) == []
        return
    assert status == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"step": "engine", "reason": "TensorRT-LLM engine build failed for rank 0: NotImplementedError: "
                                        "Unknown layer type: LayerType.PLUGIN_V3"} in manifest["skipped"]
    assert "engine" not in manifest["built"] and not (out / "engine").exists()
    assert manifest["triton_repo"]["backend"] == "onnxruntime"


def test_existing_out_refused_then_replaced_with_force(exported, tiny_checkpoints, tmp_path, capsys):
    out = Path(shutil.copytree(exported[0], tmp_path / "out"))
    before = (out / "manifest.json").read_text()
    status, _, err = build_cli(capsys, tiny_checkpoints["qwen2"], out)
    assert status == 2
    assert_one_line_error(err, str(out), "already exists", "--force")
    assert (out / "manifest.json").read_text() == before and len(list(out.rglob("*"))) > 5

    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    status, _, err = build_cli(capsys, tiny_checkpoints["qwen2"], stranger, "--force")
    assert status == 2 and (stranger / "keep.txt").read_text() == "mine"
    assert_one_line_error(err, "not a tidar-export output")

    status, stdout, _ = build_cli(capsys, tiny_checkpoints["qwen2"], out, "--force", "--tp", 1, "--engine", "skip")
    assert status == 0, stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["tp"] == 1 and manifest["options"]["engine"] == "skip"
    assert {"step": "engine", "reason": "not requested"} in manifest["skipped"]
    assert (out / "trtllm" / "rank0.safetensors").is_file() and not (out / "trtllm" / "rank1.safetensors").exists()
    assert leftovers(tmp_path, {"out", "notes"}) == []


# ---------------------------------------------------------------- bad input
def _edit_config(**changes):
    def edit(folder: Path) -> None:
        raw = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if key == "mask_token_id":
                raw["tidar"][key] = value
            else:
                raw[key] = value
        (folder / "config.json").write_text(json.dumps(raw))
    return edit


def _edit_weights(change):
    def edit(folder: Path) -> None:
        state = load_file(str(folder / WEIGHTS))
        change(state)
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    return edit


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _pickle_only(folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))


def _nan(state) -> None:
    state[Q_PROJ][0, 0] = float("nan")


BAD_INPUTS = {  # name: (damage, fragments the error names)
    "truncated-safetensors": (_truncate, [WEIGHTS, "safetensors"]),
    "missing-tensor": (_edit_weights(lambda s: s.pop(Q_PROJ)), ["missing tensor", Q_PROJ]),
    "wrong-shape": (_edit_weights(lambda s: s.__setitem__(Q_PROJ, s[Q_PROJ][:, :-1].contiguous())),
                    [WEIGHTS, Q_PROJ, "shape"]),
    "nan-weights": (_edit_weights(_nan), [Q_PROJ, "NaN"]),
    "more-layers-in-config": (_edit_config(num_hidden_layers=3), ["missing tensor", "model.layers.2."]),
    "mask-id-outside-vocab": (_edit_config(mask_token_id=10**6), ["config.json", "mask_token_id", str(10**6)]),
    "unknown-model-type": (_edit_config(model_type="gpt2"), ["config.json", "model_type", "gpt2"]),
    "pickle-only": (_pickle_only, ["pytorch_model.bin", "pickle"]),
    "tokenizer-missing": (lambda folder: (folder / "tokenizer.json").unlink(), ["tokenizer.json"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_checkpoint_is_refused(case, tiny_checkpoints, tmp_path, capsys):
    damage, fragments = BAD_INPUTS[case]
    checkpoint = Path(shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "ckpt"))
    damage(checkpoint)
    status, stdout, err = build_cli(capsys, checkpoint, tmp_path / "out")
    assert status == 2 and stdout == ""
    assert_one_line_error(err, *fragments)
    assert leftovers(tmp_path, {"ckpt"}) == []


def test_bad_options_are_refused(tiny_checkpoints, tmp_path, capsys):
    checkpoint = tiny_checkpoints["qwen2"]
    for options, fragments in ((["--tp", 3], ["tp_size", "3"]), (["--draft-len", 17], ["draft length", "17"]),
                               (["--tp", 8], ["num_attention_heads"]),
                               (["--draft-len", 4, "--draft-blocks", 5], ["draft_blocks", "5"])):
        status, _, err = build_cli(capsys, checkpoint, tmp_path / "out", *options)
        assert status == 2
        assert_one_line_error(err, *fragments)
    status, _, err = build_cli(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert status == 2
    assert_one_line_error(err, "nowhere", "not a checkpoint folder")
    assert leftovers(tmp_path, set()) == []

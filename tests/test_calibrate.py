"""Calibration of a checkpoint (runtime/calibrate.py, `tidar calibrate`) and what a server says
about the estimate it uses at start-up.

- The oracle: the acceptance `calibrate` measures by greedy replay, prompt by prompt, equals
  what `DecodeEngine` counts at (b, b) on the same prompts, and its replayed tokens per step
  equal one `replay.replay` over all prompts at once.
- acceptance.json round-trips through `autotune.load_acceptance` / `load_replayed`.
- Prompt files: a JSON list, JSON Lines of strings or objects; bad ones refused naming the file
  and entry.
- `tidar calibrate` writes the file and shows progress; `tidar serve` prints the model's start-up
  lines (which estimate, the autotune's progress) while it waits, through the real tritonserver.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tidar.runtime import autotune, calibrate, replay
from tidar.runtime.calibrate import CalibrationError, read_prompt_file
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer

PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Config:\n"]
NEW_TOKENS = 12


def test_calibration_equals_the_engines_counters(tiny_backends, tiny_checkpoints):
    backend = tiny_backends["qwen2"]
    tokenizer = Tokenizer(tiny_checkpoints["qwen2"])
    ids = [tokenizer.encode(p) for p in PROMPTS]
    result = calibrate.calibrate(backend, ids, NEW_TOKENS, draft_lens=[4, 8])
    assert result.prompts == 3 and result.draft_lens == (4, 8)
    assert set(result.counts) == {(b, k) for b in (4, 8) for k in range(1, b + 1)}
    engine = DecodeEngine(backend, draft_len=8)
    accepted, drafts = [0] * 7, 0
    for prompt in ids:
        stats = engine.generate([Request(prompt, NEW_TOKENS, eos_ids=())])[0].stats
        accepted = [a + c for a, c in zip(accepted, stats.accepted_per_position)]
        drafts += stats.drafts
    assert result.acceptance == [a / drafts for a in accepted] + [0.0] * 8  # block 16: positions past b = 8 are 0
    together = replay.replayed_tokens_per_step(
        replay.replay(backend, ids, NEW_TOKENS, autotune.draft_shapes([4, 8], range(1, 9))))
    assert result.replayed == together


def test_acceptance_json_round_trips(tiny_backends, tiny_checkpoints, tmp_path):
    backend = tiny_backends["qwen2"]
    tokenizer = Tokenizer(tiny_checkpoints["qwen2"])
    result = calibrate.calibrate(backend, [tokenizer.encode(PROMPTS[0])], 8, draft_lens=[2])
    path = calibrate.write_acceptance(tmp_path, result, "a test", prompt_set="default")
    assert path == tmp_path / autotune.ACCEPTANCE_FILE and not list(tmp_path.glob("*.partial"))
    assert autotune.load_acceptance(tmp_path, 16) == result.acceptance
    assert autotune.load_replayed(tmp_path, 16) == result.replayed == {"b2k1": result.replayed["b2k1"],
                                                                        "b2k2": result.replayed["b2k2"]}
    acceptance, replayed, said = calibrate.startup_estimate(backend, tokenizer, tmp_path)
    assert (acceptance, replayed) == (result.acceptance, result.replayed)
    assert said.startswith(f"{autotune.ACCEPTANCE_FILE} (a test, ") and "replayed tokens per step" in said
    empty = tmp_path / "empty"
    empty.mkdir()
    acceptance, replayed, said = calibrate.startup_estimate(backend, tokenizer, empty, budget_s=0.0, draft_lens=[2])
    assert said.startswith(f"no {autotune.ACCEPTANCE_FILE} in {empty}: a start-up estimate, greedy replay of 1 ")
    assert set(replayed) == {"b2k1", "b2k2"} and len(acceptance) == 15


def test_untrained_draft_length_is_refused(tiny_backends):
    backend = tiny_backends["qwen2"]
    with pytest.raises(CalibrationError, match="draft length 17 is not one the checkpoint was trained with"):
        calibrate.calibrate(backend, [[5, 6, 7]], 4, draft_lens=[17])


def test_prompt_files(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["a", "b c"]))
    assert read_prompt_file(listed) == ["a", "b c"]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('"one"\n\n{"prompt": "two"}\n{"text": "three"}\n')
    assert read_prompt_file(lines) == ["one", "two", "three"]
    lines.write_text('"one"\nnot json\n')
    with pytest.raises(CalibrationError, match=r"prompts.jsonl: line 2 is not JSON"):
        read_prompt_file(lines)
    lines.write_text('{"prompt": ""}\n')
    with pytest.raises(CalibrationError, match=r"prompts.jsonl: entry 1 is not a non-empty string"):
        read_prompt_file(lines)
    with pytest.raises(CalibrationError, match="no such prompt file"):
        read_prompt_file(tmp_path / "missing.json")


def test_tidar_calibrate_writes_acceptance_json_with_progress(tiny_checkpoints, tmp_path):
    model = shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "model")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS[:2]))
    run = subprocess.run([sys.executable, "-m", "tidar.cli", "calibrate", str(model), "--prompts", str(prompts),
                          "--max-new-tokens", "8", "--draft-lens", "4"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "calibrating (greedy replay)" in run.stderr and "2/2" in run.stderr  # the progress bar
    data = json.loads((model / autotune.ACCEPTANCE_FILE).read_text())
    assert data["measured_by"] == "tidar calibrate" and data["prompts"] == 2 and data["prompt_set"] == "prompts.json"
    assert set(data[autotune.REPLAY_FIELD]) == {"b4k1", "b4k2", "b4k3", "b4k4"}
    bad = subprocess.run([sys.executable, "-m", "tidar.cli", "calibrate", str(model), "--prompts",
                          str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "missing.json: no such prompt file" in bad.stderr and "Traceback" not in bad.stderr


def test_tidar_serve_shows_the_start_up_and_its_estimate(tiny_checkpoints, tmp_path):
    """Through the real tritonserver: while `tidar serve` waits for readiness it prints the
    model's start-up lines, which say which estimate the autotune uses (no acceptance.json here)."""
    from tidar.serving.repository import render_repository

    repo = render_repository(tmp_path / "repo", model_dir=str(tiny_checkpoints["qwen2"]), backend="torch",
                             dtype="float32", attention="eager", threads=1, autotune_batch_sizes="1",
                             autotune_draft_lens="0,2", autotune_repeats=2, autotune_budget=30)
    run = subprocess.run([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port", "0", "--http-port",
                          "0", "--metrics-port", "0", "--ready-timeout", "300", "--", sys.executable, "-c",
                          "print('served')"], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stderr.splitlines() if line.startswith("tidar start-up:")]
    assert any("loading" in line for line in said), run.stderr
    assert any(f"expected tokens per step from no {autotune.ACCEPTANCE_FILE}" in line for line in said), run.stderr
    assert any("autotune: done in" in line and "batch 1 uses" in line for line in said), run.stderr
    assert run.stderr.index("autotune: done") < run.stderr.index("ready:")
    refused = subprocess.run([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--ready-timeout", "0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--ready-timeout must be a positive number of seconds, got 0.0" in refused.stderr


def test_an_estimate_that_overruns_leaves_the_race_half_the_budget(tiny_checkpoints, monkeypatch):
    """A replay that cannot be cut short may take the whole autotune budget (a large model's one
    prompt); the start-up race of draft shapes then still gets half of it, not the nothing left
    over that timed AR alone (serving.requests.race_budget)."""
    import time

    from tidar.runtime import calibrate as calibrate_module
    from tidar.serving import requests as serving_requests
    from tidar.serving.options import ServingOptions
    from tidar.serving.supervisor import AUTOTUNE_CACHE_ENV

    real_estimate, budgets = calibrate_module.startup_estimate, []

    def slow_estimate(*args, **kwargs):
        time.sleep(2.5)  # more than the whole budget of 2 s
        return real_estimate(*args, **kwargs)

    def measure(*args, budget_s=None, **kwargs):
        budgets.append(budget_s)
        return real_measure(*args, budget_s=budget_s, **kwargs)

    real_measure = autotune.BatchDraftPolicy.measure
    monkeypatch.setattr(calibrate_module, "startup_estimate", slow_estimate)
    monkeypatch.setattr(autotune.BatchDraftPolicy, "measure", staticmethod(measure))
    monkeypatch.delenv(AUTOTUNE_CACHE_ENV, raising=False)  # no policy from an earlier start
    options = ServingOptions(model_dir=str(tiny_checkpoints["qwen2"]), backend="torch", dtype="float32",
                             attention="eager", threads=1, autotune_batch_sizes=(1,), autotune_draft_lens=(0, 2),
                             autotune_repeats=2, autotune_budget=2.0)
    scheduler = serving_requests.build_scheduler(Path(options.model_dir), options)[0]
    scheduler.close()
    assert budgets == [1.0]

"""The GPU acceptance command (benchmarks/gpu_acceptance.py) where no GPU is: its refusal, its
verdict, the simulated-acceptance arithmetic and its plot on a report of the real structure, and
the logic of its sections on a CPU: section d's cache holds its past where plan() reads it, section
f's logit tolerance, section h's served run with CUDA-graph capture stood in, section i's skip
with the reason on one device. The sections themselves need CUDA and run on a GPU host
(`bash benchmarks/gpu_acceptance.sh`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.sh"


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_exits_2_at_once_with_the_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the command would run the acceptance")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "-o", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs one CUDA GPU" in done.stderr and "torch sees no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


def test_sections_are_a_to_i_in_order(acceptance):
    assert list(acceptance.SECTIONS) == ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
    assert acceptance.parse_args([]).sections == ["a", "b", "c", "d", "e", "f", "g", "h", "i"]


def test_cache_with_past_sets_the_lengths_plan_reads(acceptance, tiny_backends):
    """Section d's cache: the host copy of the lengths (what TiDARModel.plan reads) and the
    device copy both hold the past, so the curve measures a forward over that past."""
    model = tiny_backends["qwen2"].model
    cache = acceptance.cache_with_past(model, 2, 24, 8)
    assert cache.host_lengths == [24, 24] and cache.max_length() == 24
    assert cache.lengths.tolist() == [24, 24] and cache.capacity == 32
    assert cache.keys.abs().sum() > 0  # random K/V over the past


def test_logits_agree(acceptance):
    reference = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.99, 0.0]])
    assert acceptance.logits_agree(reference, reference + 0.04)["ok"]
    assert not acceptance.logits_agree(reference, reference + 0.06)["ok"]  # beyond the tolerance
    close_call = reference.clone()
    close_call[1, 1] = 2.01  # the second row's top-2 margin is within 2 x tolerance: a flip there is allowed
    found = acceptance.logits_agree(reference, close_call)
    assert found["ok"] and found["clear_positions"] == 1 and found["argmax_flips"] == 0
    assert acceptance.logits_agree(torch.tensor([[5.0, 4.0, 0.0]]), torch.tensor([[4.99, 5.04, 0.0]]),
                                   tolerance=0.05)["ok"] is False


def test_second_device_is_skipped_with_the_reason_on_one_device(acceptance):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problem = acceptance.second_device_problem()
    assert (problem is None) == (count >= 2)
    if problem:
        assert f"torch.cuda.device_count() = {count}" in problem


def test_graphs_at_startup_logic_with_capture_stood_in(acceptance, monkeypatch):
    """Section h's served run on a CPU: the bundled model's torch backend with a counting capture
    layer in place of CUDA graph capture (backends/cuda_graphs.GraphedForward's `capture`)."""
    from tidar import BUNDLED_MODEL
    from tidar.runtime.backends import loading
    from tidar.runtime.backends.cuda_graphs import GraphedForward
    from tidar.runtime.backends.torch_backend import TorchBackend

    backend = TorchBackend.load(BUNDLED_MODEL, dtype="float32", attention="sdpa", cuda_graphs=False)
    backend.graphs = GraphedForward(backend.model, capture=lambda step: step)
    monkeypatch.setattr(loading, "load_backend", lambda name, folder, **options: backend)
    result = acceptance._served_run("cpu", rows=4)
    assert result["ok"], result
    assert result["graphs_at_startup"] > 0 and result["captures_while_serving"] == 0
    assert result["cache"][0] == 4 and len(result["outputs"]) == 4 and all(result["outputs"])


def test_graph_speedups_pair_each_graphed_step_with_its_eager_one(acceptance):
    rows = [{"attention": "sdpa", "batch": batch, "draft_len": b, "cuda_graphs": graphs, "ms": ms}
            for batch, b, graphs, ms in ((1, 0, False, 6.0), (1, 0, True, 2.0), (16, 16, False, 30.0),
                                         (16, 16, True, 25.0))]
    assert acceptance.graph_speedups(rows) == {"sdpa batch 1 b 0": 3.0, "sdpa batch 16 b 16": 1.2}


def test_verdict(acceptance):
    passed = {"sections": {"a": {"ok": True}, "f": {"skipped": True, "reason": "tensorrt is not importable"}}}
    assert acceptance.verdict(passed) == 0
    assert acceptance.verdict({"sections": {"a": {"ok": True}, "b": {"ok": False}}}) == 1
    assert acceptance.verdict({"sections": {"b": {"ok": False, "error": "RuntimeError: boom"}}}) == 1
    assert acceptance.verdict({"sections": {"f": {"skipped": True}}}) == 1  # a skip must say why


def test_simulated_acceptance_arithmetic(acceptance):
    # 20 decode steps per second at batch 16, each row taking the paper's 7.45 tokens per step
    assert acceptance.simulated_tokens_per_second(20.0, 16) == pytest.approx(20 * 16 * 7.45)
    assert acceptance.simulated_tokens_per_second(10.0, 1, tokens_per_forward=1.0) == 10.0
    assert acceptance.within(0.010, 0.004, 0.002) and not acceptance.within(0.011, 0.004, 0.002)


def test_report_is_written_as_json_and_png(acceptance, tmp_path):
    """The writer and the plot on a report with every section's structure (values made up)."""
    case = lambda b, past, t: {"draft_len": b, "past": past, "ms": {"triton": t, "flex": 1.5 * t, "sdpa": 2 * t}}
    report = {
        "environment": {"device": "stand-in", "driver": "0", "torch": torch.__version__, "triton": "3.5.0",
                        "date": "2026-01-01T00:00:00+00:00"},
        "sections": {
            "a": {"ok": True, "checks": []},
            "b": {"ok": True, "checks": [{"dtype": "float16", "max_error": 1e-3, "sdpa_error": 1e-3},
                                         {"dtype": "bfloat16", "max_error": 8e-3, "sdpa_error": 8e-3}]},
            "c": {"ok": True, "cases": [case(b, p, 0.01 * p / 512) for b in (4, 8, 16) for p in (512, 2048, 8192)]},
            "d": {"ok": True, "results": [{"attention": a, "kind": "causal", "size": q, "query_tokens": q, "ms": 5 + q / 100}
                                          for a in ("sdpa", "triton") for q in (1, 16, 512)]
                  + [{"attention": "triton", "kind": "decode", "size": 16, "query_tokens": 272, "ms": 7.0}]},
            "e": {"ok": True, "rows": [{"batch": 1, "mode": "ar", "measured_tokens_per_second": 50.0},
                                       {"batch": 1, "mode": "tidar", "measured_tokens_per_second": 40.0,
                                        "simulated_tokens_per_second": 300.0}]},
            "f": {"skipped": True, "reason": "no TensorRT"},
        },
    }
    acceptance.write(tmp_path, report)
    assert (tmp_path / "gpu_acceptance.json").is_file()
    assert (tmp_path / "gpu_acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

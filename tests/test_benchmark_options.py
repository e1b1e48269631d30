"""Benchmark scripts refuse contradictory options at once, naming them (exit status 2, nothing run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,named", [
    (["--clock", "cpu", "--threads", "2"], "--clock cpu measures one thread: give --threads 1"),
    (["--clock", "cpu"], "--clock cpu measures one thread: give --threads 1"),
    (["--backend", "onnxruntime", "--lm-head-rows", "72"], "--lm-head-rows times the torch backend's head"),
])
def test_step_latency_refuses_contradictory_options(args, named, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_latency.py"), str(tmp_path), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert named in result.stderr and "Traceback" not in result.stderr

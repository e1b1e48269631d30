"""measure_step_seconds waits for the device before stopping the clock (code-review R4): CUDA
runs kernels asynchronously, so a forward "returns" before its last layers ran. Checked with a
stand-in backend whose output lives on a CUDA device and a stand-in synchronize that takes
20 ms: the measured step time must include it (no GPU needed)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from fakes.logits_backend import LogitsBackend
from tidar.runtime import autotune


class DeferredBackend(LogitsBackend):
    """Returns at once; its work 'finishes' only when the device is synchronized."""

    config = SimpleNamespace(mask_token_id=0)

    def new_cache(self, batch, capacity):
        return SimpleNamespace(commit=lambda counts: None)

    def logits(self, tokens, layout, cache):
        return SimpleNamespace(device=torch.device("cuda", 0))

    def head(self, hidden):
        return hidden


def test_step_time_includes_the_device_work(monkeypatch):
    waits = []

    def synchronize(device=None):
        waits.append(device)
        time.sleep(0.02)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    seconds = autotune.measure_step_seconds(DeferredBackend(), [0, 4], repeats=3)
    assert set(seconds) == {0, 4} and all(value >= 0.02 for value in seconds.values())
    assert len(waits) == 2 * 3 and waits[0] == torch.device("cuda", 0)

"""Multi-GPU placement without a GPU: what makes work land on an instance's own device.

Triton launches a kernel on the calling thread's current CUDA device (triton/runtime/jit.py asks
`driver.active.get_current_device()`), and a new thread's current device is 0; TensorRT
deserializes an engine and allocates on the current device too. Checked on CPU:
- the hybrid-attention launcher enters `torch.cuda.device(query.device)` for CUDA tensors, and
  nothing for CPU ones (the interpreter);
- the scheduler thread makes its backend's CUDA device current before its first step;
- `load_engine` hands the instance's device to the engine backend, which deserializes under it.
"""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import torch

from tidar.plugins.hybrid_attention import launch_device
from tidar.runtime.backends import engine_backend, loading
from tidar.serving import scheduler as scheduler_module


def test_kernel_launch_enters_the_tensors_device():
    guard = launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch_device(torch.device("cpu")), contextlib.nullcontext)


def test_scheduler_thread_makes_the_backend_device_current(monkeypatch):
    chosen, done = [], threading.Event()

    def set_device(device):
        chosen.append((threading.current_thread().name, torch.device(device)))
        done.set()
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    scheduler_module.use_backend_device(SimpleNamespace(device=torch.device("cuda", 1)))
    scheduler_module.use_backend_device(SimpleNamespace(device=torch.device("cpu")))  # nothing to do
    scheduler_module.use_backend_device(SimpleNamespace())  # a backend without a device: nothing to do
    assert chosen == [(threading.current_thread().name, torch.device("cuda", 1))]

    class Backend:  # just enough for Scheduler.__init__ and an idle loop
        device = torch.device("cuda", 1)
        config = SimpleNamespace(block_size=4, vocab_size=10, max_position_embeddings=64)

    chosen.clear()
    done.clear()
    idle_engine = SimpleNamespace(batch_size=0, request_ids=lambda: [], finish=lambda ids, reason: [])
    monkeypatch.setattr(scheduler_module, "DecodeEngine", lambda *args, **kwargs: idle_engine)
    scheduler = scheduler_module.Scheduler(Backend(), None, scheduler_module.SchedulerConfig(draft_len=0))
    try:
        assert done.wait(10)
        assert chosen == [("tidar-scheduler", torch.device("cuda", 1))]
    finally:
        scheduler.close()


def test_load_engine_passes_the_instance_device(monkeypatch, tiny_checkpoints):
    seen = {}

    def tensorrt(folder, config=None, device="cuda"):
        seen["device"] = device
        return SimpleNamespace(dtype=torch.float32)
    monkeypatch.setattr(engine_backend.EngineBackend, "tensorrt", staticmethod(tensorrt))
    loading.load_backend("tensorrt", tiny_checkpoints["qwen2"], device="cuda:1")
    assert seen["device"] == "cuda:1"

"""What EngineBackend hands a TensorRT engine each step (runtime/backends/engine_backend.py).

Against a stand-in engine declaring the TensorRT-LLM engine's I/O (tests/fakes/tensorrt_engine.py,
bf16 K/V, int32 indices; its computation here: hidden states of zeros and `present` = the past
followed by new K/V of a marker value), on CPU:
- every address given to `set_tensor_address` is non-null and a multiple of 256 bytes
  (NvInferRuntime.h), also for the empty past of a prefill and for a row view of a cache whose
  rows are not a multiple of 256 bytes (bf16, odd capacity), and the bound tensors hold the feeds;
- no tensor is made from Python data per step once a layout has been seen (the layout scalars are
  made once), counted with a dispatch mode over the step's aten calls;
- only the slots a step can change are written back: a row's committed past is left as it is,
  the new tokens' K/V land at each row's own slots.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fakes.tensorrt_engine import DeclaredEngine
from tidar.export.trtllm_checkpoint import trtllm_config
from tidar.export.trtllm_model import builder_ranges, input_specs, output_specs
from tidar.runtime.backends.engine_backend import ADDRESS_ALIGNMENT, EngineBackend, aligned, tensor_address
from tidar.runtime.cache import KVCache
from tidar.runtime.config import TiDARConfig
from tidar.runtime.layout import Layout

SPEC_TO_TRT = {"float32": "FLOAT", "bfloat16": "BF16", "int32": "INT32"}
MARKER = 7.0


def test_aligned():
    raw = torch.arange(200, dtype=torch.bfloat16)
    view = raw[3:3 + 64].view(4, 16)  # 6 bytes past an allocation: not 256-aligned
    copy = aligned(view)
    assert tensor_address(copy) % ADDRESS_ALIGNMENT == 0 and torch.equal(copy, view)
    empty = aligned(raw[:0].view(1, 2, 0, 4))
    assert tensor_address(empty) and tensor_address(empty) % ADDRESS_ALIGNMENT == 0 and empty.shape == (1, 2, 0, 4)
    dense = aligned(view.clone())
    assert aligned(dense) is dense  # an aligned dense tensor is bound as it is


class Recorder:
    """The stand-in's computation: zeros for the hidden states, present = past then MARKER."""

    def __init__(self, config: TiDARConfig):
        self.config = config

    def __call__(self, feeds: dict) -> dict:
        batch, new = feeds["input_ids"].shape
        out = {"hidden_states": np.zeros((batch, new, self.config.hidden_size), np.float32)}
        for layer in range(self.config.num_hidden_layers):
            for kind in ("key", "value"):
                past = feeds[f"past_{kind}_{layer}"]
                marker = np.full(past.shape[:2] + (new, past.shape[3]), MARKER, np.float32)
                out[f"present_{kind}_{layer}"] = np.concatenate([past, marker], axis=2)
        return out


@pytest.fixture
def engine_backend(tiny_checkpoints, monkeypatch):
    config = TiDARConfig.from_file(tiny_checkpoints["qwen2"])
    checkpoint = trtllm_config(config, 1, "bfloat16")
    declared = {s.name: (True, SPEC_TO_TRT[s.dtype], s.dims) for s in input_specs(checkpoint)}
    declared.update({s.name: (False, SPEC_TO_TRT[s.dtype], s.dims) for s in output_specs(checkpoint)})
    engine = DeclaredEngine(declared, builder_ranges(checkpoint, 8, 1023, 1024 + 20, 4), Recorder(config))
    addresses = []
    real_set = engine.set_tensor_address

    def set_tensor_address(name, pointer):
        addresses.append((name, pointer))
        return real_set(name, pointer)
    engine.set_tensor_address = set_tensor_address
    real_bind = EngineBackend.bind

    def bind(self, *args):
        engine.bound = real_bind(self, *args)
        return engine.bound
    monkeypatch.setattr(EngineBackend, "bind", bind)
    head = torch.zeros(config.vocab_size, config.hidden_size)
    return EngineBackend(engine, config, "trtllm", head, device="cpu"), engine, addresses


def test_every_bound_address_is_aligned_and_holds_the_feed(engine_backend):
    backend, engine, addresses = engine_backend
    config = backend.config
    cache = KVCache(config.num_hidden_layers, 3, config.num_key_value_heads, 37, config.head_dim,
                    dtype=torch.bfloat16)  # 37 slots x 32 x 2 bytes per head row: rows are not 256-byte multiples
    cache.keys.normal_()
    cache.values.normal_()
    cache.lengths = [0, 0, 0]
    row = cache.row(1)
    layout = Layout.autoregressive(5)
    backend.hidden_states(torch.randint(0, 100, (1, 5)), layout, row)  # a prefill: the past is empty
    row_steps = [(name, pointer) for name, pointer in addresses]
    assert any(engine.bound[name].numel() == 0 for name, _ in row_steps)  # the empty past was bound
    cache.lengths = [9, 4, 6]
    backend.hidden_states(torch.randint(0, 100, (3, 6)), Layout.decode(2), cache)
    assert len(addresses) == 2 * len(engine.declared)
    assert all(pointer and pointer % ADDRESS_ALIGNMENT == 0 for _, pointer in addresses), addresses
    past = engine.bound["past_key_1"]
    assert torch.equal(past, cache.keys[1, :, :, :9])


def test_no_tensor_from_python_data_per_step(engine_backend):
    from torch.utils._python_dispatch import _disable_current_modes

    backend, engine, _ = engine_backend
    execute = engine.execute_async_v3

    def uncounted(stream):  # the stand-in's own computation (numpy round trips) is not the step's
        with _disable_current_modes():
            return execute(stream)
    engine.execute_async_v3 = uncounted
    config = backend.config
    cache = KVCache(config.num_hidden_layers, 2, config.num_key_value_heads, 64, config.head_dim, dtype=torch.bfloat16)
    cache.lengths = [5, 8]
    ids, layout = torch.randint(0, 100, (2, 6)), Layout.decode(2)
    backend.hidden_states(ids, layout, cache)  # first step of this layout: its scalars are made

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count() as counted:
        backend.hidden_states(ids, layout, cache)
    made = [op for op in counted.ops if "lift_fresh" in op or "scalar_tensor" in op]
    assert counted.ops and not made, made


def test_only_the_new_slots_are_written_back(engine_backend):
    backend, _, _ = engine_backend
    config = backend.config
    cache = KVCache(config.num_hidden_layers, 2, config.num_key_value_heads, 40, config.head_dim, dtype=torch.bfloat16)
    cache.keys.fill_(1.0)
    cache.values.fill_(1.0)
    cache.lengths = [3, 10]
    layout = Layout.decode(2)
    before = cache.keys.clone()
    backend.hidden_states(torch.randint(0, 100, (2, layout.num_new)), layout, cache)
    # row 1 (past 10): slots 10 .. 10 + new hold the new K/V; its past is untouched
    assert torch.equal(cache.keys[:, 1, :, :10], before[:, 1, :, :10])
    assert (cache.keys[:, 1, :, 10:10 + layout.num_new] == MARKER).all()
    # row 0 (past 3): its past untouched; the stand-in put its new K/V after the padded past of 10
    assert torch.equal(cache.keys[:, 0, :, :3], before[:, 0, :, :3])
    assert torch.equal(cache.keys[:, :, :, 10 + layout.num_new:], before[:, :, :, 10 + layout.num_new:])

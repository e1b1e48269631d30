"""Helpers of the tests that run the real tritonserver: a module's server that must stop cleanly,
the greedy AR oracle, the `tidar` model's metrics (tidar_* and vllm:*), waiting for a condition."""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request

from tidar import BUNDLED_MODEL
from tidar.runtime.backends.torch_backend import TorchBackend
from tidar.runtime.generate import DecodeEngine, Request
from tidar.runtime.tokenizer import Tokenizer
from tidar.serving.serve import TritonServer


@contextlib.contextmanager
def running_server(repo):
    """tritonserver on `repo` (free ports). On exit it must stop with status 0: every stream ended,
    finished or cancelled, so the models unload (docs/design.md §6.1)."""
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0).start()
    try:
        yield server
    finally:
        status = server.stop()
    assert status == 0, f"tritonserver did not stop cleanly (status {status}); its log: {server.log_file}"


def greedy_oracle(model=BUNDLED_MODEL):
    """`run(text, max_tokens)`: the fp32 greedy AR result of this runtime's reference backend."""
    engine = DecodeEngine(TorchBackend.load(model, dtype="float32"), Tokenizer(model), draft_len=0)
    return lambda text, max_tokens: engine.generate([Request(engine.tokenizer.encode(text), max_tokens)])[0]


def metrics(server) -> dict[str, float]:
    """The `tidar` model's tidar_* and vllm:* samples summed over label sets; labelled ones also
    under name{label="value"}."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'((?:tidar_|vllm:)[\w:]+)\{([^}]*)\} (\S+)', line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2), float(match.group(3))
        if 'model="tidar"' not in labels:
            continue
        values[name] = values.get(name, 0.0) + value
        for label in re.findall(r'(outcome|position)="([^"]*)"', labels):
            values[f'{name}{{{label[0]}="{label[1]}"}}'] = value
    return values


def settled_metrics(server, timeout=30.0) -> dict[str, float]:
    """Metrics once no request is running and the last updates are published (two reads, more
    than the model's publishing period apart, agree)."""
    deadline = time.monotonic() + timeout
    previous = metrics(server)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = metrics(server)
        if current == previous and current.get("tidar_active_rows", 0) == 0:
            return current
        previous = current
    raise AssertionError(f"metrics did not settle: {previous}")


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False

"""Host time of the TensorRT-LLM Python plugin's callback, per layer per step (design §4, N12).

    TRITON_INTERPRET=1 python benchmarks/plugin_host_cost.py [--calls 2000] [-o out.json]

The TensorRT-LLM engine calls `TiDARHybridAttention.forward` (plugins/trtllm_plugin.py) from
TensorRT once per attention layer per step. This measures, on a CPU, the Python work of that
callback that does not need a GPU: the op's checks (`_check`) and the launcher's checks, layout
arguments, tile choice and grid (`hybrid_attention`) with the Triton launch itself replaced by a
no-op, on tensors of the Qwen2.5-1.5B shape (12 query heads, 2 KV heads, head_dim 128, bf16) for a
TiDAR step of b = 16 (272 query tokens) over a past of 1024, batch 1; layout scalars as 0-d
tensors, as the plugin passes them. It is a lower bound of the callback's host time: not counted
are TensorRT's C++ -> Python crossing, wrapping the ten device pointers as torch tensors
(`tensor_from_pointer`), entering the external stream, and Triton's own launcher. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, LAYERS = 12, 2, 128, 28  # Qwen2.5-1.5B
NUM_NEW, PAST = 272, 1024


class _NoLaunch:
    """Stands in for the compiled kernel: `kernel[grid](*args, **kwargs)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("-o", "--output")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("plugin_host_cost: set TRITON_INTERPRET=1 (the launcher then accepts CPU tensors)", file=sys.stderr)
        return 2
    from tidar.plugins import hybrid_attention, trtllm_plugin
    from tidar.runtime.layout import Layout

    hybrid_attention._hybrid_attention_kernel = _NoLaunch()
    query = torch.zeros(1, NUM_HEADS, NUM_NEW, HEAD_DIM, dtype=torch.bfloat16)
    key = torch.zeros(1, NUM_KV_HEADS, PAST + NUM_NEW, HEAD_DIM, dtype=torch.bfloat16)
    value, out = torch.zeros_like(key), torch.empty_like(query)
    scalars = [torch.tensor(v) for v in Layout.decode(16).kernel_scalars().values()]
    inputs = [query, key, value, torch.tensor([PAST]), *scalars]
    scale = HEAD_DIM ** -0.5

    def callback():
        trtllm_plugin._check(inputs, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, scale)
        hybrid_attention.hybrid_attention(*inputs, scale=scale, out=out)

    for _ in range(100):
        callback()
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        callback()
        times.append(time.perf_counter() - start)
    per_call = statistics.median(times) * 1e6
    result = {"what": "Python work of one plugin callback, Triton launch excluded (lower bound)",
              "median_us_per_layer_per_step": round(per_call, 1),
              "per_step_us_at_28_layers": round(per_call * LAYERS, 1), "calls": args.calls,
              "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "num_new": NUM_NEW,
                        "past": PAST, "batch": 1}, "cpu": platform.processor() or platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

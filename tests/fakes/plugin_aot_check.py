"""Run the project's TensorRT plugin through NVIDIA's real `tensorrt.plugin` over the stand-in for
TensorRT's compiled module (tensorrt_standin.py), the way TensorRT's builder uses an
ahead-of-time plugin; print JSON.

    python tests/fakes/plugin_aot_check.py [--defect no-return-annotation] [--triton-version 3.9.0]

Needs a fresh interpreter without TRITON_INTERPRET. The kernel is compiled for sm_90 (standing in
for "the building GPU" only: triton.compile's target). `--defect` re-introduces a known defect
(or an old TensorRT) before registering, to show the check catches it; `--triton-version` makes the kernel compile
see another Triton release, `--max-shared` a smaller shared-memory limit. Prints {"register": ...} or {"build": ...} with the error, or
{"builds": [...]} with what the builder got for each case.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

if __package__:  # imported as fakes.plugin_aot_check (tests name the script by this module's file)
    from . import tensorrt_standin
else:  # run as a script: its folder is sys.path[0]
    import tensorrt_standin

CASES = [  # (query dtype, index dtype, num_heads, num_kv_heads, head_dim, sizes)
    ("BF16", "INT64", 12, 2, 128, {"B": 3, "Q": 20, "S": 532}),
    ("HALF", "INT32", 16, 16, 64, {"B": 1, "Q": 272, "S": 2320}),
    ("HALF", "INT64", 8, 2, 128, {"B": 2, "Q": 48, "S": 600}),  # a k-of-b step: b = 16, k = 2 (16 + 2 * 16 tokens)
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--defect", choices=("no-return-annotation", "tensorrt-10.8"))
    parser.add_argument("--triton-version")
    parser.add_argument("--max-shared", type=int, help="a smaller shared-memory limit, to see a shape refused")
    args = parser.parse_args()
    trtp = tensorrt_standin.install()
    from triton.backends.compiler import GPUTarget

    from tidar.plugins import hybrid_attention, tensorrt_plugin

    hybrid_attention.aot_kernel = functools.partial(hybrid_attention.aot_kernel, target=GPUTarget("cuda", 90, 32))
    if args.defect == "no-return-annotation":
        real = trtp.aot_impl

        def aot_impl(plugin_id):
            def decorate(function):
                function.__annotations__.pop("return", None)
                return real(plugin_id)(function)
            return decorate
        trtp.aot_impl = aot_impl
    if args.defect == "tensorrt-10.8":  # TensorRT 10.6-10.8: tensorrt.plugin without ahead-of-time plugins
        del trtp.aot_impl
    try:
        tensorrt_plugin.register()
    except RuntimeError as error:
        print(json.dumps({"register": str(error)}))
        return 0
    tensorrt_plugin.register()  # idempotent
    tensorrt_plugin._registered = False
    tensorrt_plugin.register()  # a second definition attempt: TensorRT's "already has a definition" is success
    if args.max_shared:
        from tidar.plugins import contract

        contract.MAX_SHARED_BYTES = args.max_shared
    if args.triton_version:
        import triton

        triton.__version__ = args.triton_version
    DataType = sys.modules["tensorrt"].DataType
    builds = []
    for dtype, index, heads, kv_heads, head_dim, sizes in CASES:
        attributes = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim, "scale": head_dim ** -0.5}
        dims = [("B", heads, "Q", head_dim), ("B", kv_heads, "S", head_dim), ("B", kv_heads, "S", head_dim), ("B",),
                *[()] * 5]
        dtypes = [DataType[dtype]] * 3 + [DataType[index]] * 6
        try:
            built = tensorrt_standin.build_aot(tensorrt_plugin.PLUGIN_ID, attributes, dtypes, dims, sizes)
        except (RuntimeError, ValueError) as error:
            print(json.dumps({"build": str(error)}))
            return 0
        built["case"] = {"dtype": dtype, "index": index, "num_heads": heads, "num_kv_heads": kv_heads,
                         "head_dim": head_dim, "sizes": sizes}
        built["ptx_entry"] = built.pop("ptx").split(".entry", 1)[1].split(")", 1)[0]
        builds.append(built)
    print(json.dumps({"builds": builds, "compiled": tensorrt_plugin.compiled_kernels()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

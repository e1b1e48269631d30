"""PTX statistics of the ahead-of-time hybrid-attention kernel, per target GPU, dtype and head dim.

    python benchmarks/kernel_ptx.py [--arch 80 90 100] [--dtype float16 bfloat16] [--head-dim 64 128]
                                    [--jobs 2] [-o stats.json]

No GPU needed: each kernel is compiled by `hybrid_attention.aot_kernel` (the kernel TensorRT
gets) for an explicit `triton.backends.compiler.GPUTarget`, then assembled by the `ptxas` bundled
with Triton with `-v`, which reports registers, spills and shared memory. Also counted in the
PTX: 16-byte vector global loads (`ld.global.v4`), scalar 16-bit global loads, and the entry's
parameters (TensorRT passes inputs + int32 arguments + output). Prints one JSON object per
shape (or writes them all to -o).

`--jit NUM_NEW` measures the tiles the torch launcher (the just-in-time kernel) uses for steps of
NUM_NEW query tokens instead (`contract.launch_config(head_dim, dtype, num_new=NUM_NEW)`, compiled
with the same body and signature as the ahead-of-time kernel); `--num-warps` overrides the warps
(to compare with the default, `contract.default_num_warps`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

PRODUCTION = {"arch": (80, 90, 100), "dtype": ("float16", "bfloat16"), "head_dim": (64, 128)}


def ptxas_path() -> str:
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no ptxas bundled with triton in {folder}")


def gpu_name(arch: int) -> str:
    """ptxas' name of the target Triton compiles for (the `a` variants from sm_90 on)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def statistics(arch: int, dtype: str, head_dim: int, index_dtype: str = "int64", jit_num_new: int | None = None,
               num_warps: int | None = None) -> dict:
    """Compile one shape and measure it (see the module docstring)."""
    from types import SimpleNamespace

    from triton.backends.compiler import GPUTarget

    from tidar.plugins import contract
    from tidar.plugins.hybrid_attention import aot_kernel, compile_kernel

    target = GPUTarget("cuda", arch, 32)
    if jit_num_new is None and num_warps is None:
        kernel = aot_kernel(dtype, index_dtype, head_dim, head_dim ** -0.5, target=target)
    else:
        config = (contract.launch_config(head_dim, dtype, num_new=jit_num_new, num_warps=num_warps)
                  if jit_num_new is not None else
                  dataclasses.replace(contract.aot_configs(head_dim, dtype, 2)[0], num_warps=num_warps))
        compiled, config = compile_kernel(dtype, index_dtype, head_dim, head_dim ** -0.5, target=target, config=config)
        ptx = compiled.asm["ptx"]
        version = re.search(r"^\.version\s+(\S+)", ptx, re.M)
        kernel = SimpleNamespace(ptx=ptx, shared=compiled.metadata.shared, config=config,
                                 num_warps=compiled.metadata.num_warps, ptx_version=version.group(1) if version else "?")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(kernel.ptx)
        done = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu_name(arch)}", path, "-o",
                               os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed on sm_{arch} {dtype} head_dim={head_dim}: {done.stderr}")
    report = done.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    entry = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", kernel.ptx, re.S)
    return {"arch": f"sm_{arch}", "dtype": dtype, "head_dim": head_dim, "index_dtype": index_dtype,
            "kernel": "aot" if jit_num_new is None else f"jit, {jit_num_new} query tokens",
            "registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_frame": number(r"(\d+) bytes stack frame"),
            "shared_bytes": kernel.shared, "block_m": kernel.config.block_m, "block_n": kernel.config.block_n,
            "num_warps": kernel.num_warps, "num_stages": kernel.config.num_stages,
            "vector_loads": kernel.ptx.count("ld.global.v4"),
            "scalar_16bit_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", kernel.ptx)),
            "entry_params": len([p for p in entry.group(1).split(",") if p.strip()]),
            "ptx_version": kernel.ptx_version}


def _statistics(args) -> dict:
    return statistics(*args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(PRODUCTION["arch"]))
    parser.add_argument("--dtype", nargs="+", default=list(PRODUCTION["dtype"]))
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(PRODUCTION["head_dim"]))
    parser.add_argument("--index-dtype", default="int64", choices=("int32", "int64"))
    parser.add_argument("--jit", type=int, metavar="NUM_NEW", help="the torch launcher's tiles for NUM_NEW query tokens")
    parser.add_argument("--num-warps", type=int, help="override the warps (default: contract.default_num_warps)")
    parser.add_argument("--jobs", type=int, default=1, help="compiles in parallel (processes)")
    parser.add_argument("-o", "--output", help="write the list as JSON here (default: one line per shape on stdout)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("kernel_ptx: unset TRITON_INTERPRET (the kernel must be compiled)", file=sys.stderr)
        return 2
    shapes = [(arch, dtype, head_dim, args.index_dtype, args.jit, args.num_warps)
              for arch, dtype, head_dim in itertools.product(args.arch, args.dtype, args.head_dim)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_statistics, shapes))
    else:
        results = [statistics(*shape) for shape in shapes]
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

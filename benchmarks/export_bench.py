"""Time and memory of `tidar-export build` on one checkpoint, measured from outside the build.

Runs `tidar-export build CHECKPOINT -o OUT` as a child process and records its wall time, its
peak resident memory (the kernel's own account of that child, `os.wait4`'s ru_maxrss), the time
of each build step (from the progress lines the build prints on stderr), the checkpoint's and
the output's size on disk, and the ratio of peak memory to checkpoint size. Writes one JSON
object with the date, machine and versions.

    python benchmarks/export_bench.py [CHECKPOINT] --out RESULT.json [--tp N] [--dtype D] [--engine auto|skip]
                                      [--keep DIR] [--time-limit S]

CHECKPOINT defaults to the bundled model. OUT goes to a temporary folder (removed afterwards)
unless --keep names one: exports of large checkpoints are large. The build's progress lines are
echoed to stderr with their time as they arrive. With --time-limit S (or on SIGTERM / SIGINT) the
build is interrupted with SIGINT, so it removes its partial output, and the result records the
steps reached, the bytes written so far and the peak RSS until then (`"stopped"`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import tidar

STEP_LINE = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")


def folder_size(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def anonymous(text: str, paths: dict[str, str]) -> str:
    """`text` with each machine path of `paths` replaced by its placeholder (results are shared)."""
    for path, placeholder in sorted(paths.items(), key=lambda item: -len(item[0])):  # deepest first
        text = text.replace(path, placeholder)
    return text


def machine() -> dict:
    memory = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = round(total_kb / 2**20, 1)
    return {"description": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.system()}",
            "cpus": os.cpu_count(), "memory_gib": memory, "python": platform.python_version(),
            "torch": torch.__version__, "tidar": tidar.__version__}


def partial_files(out: Path) -> dict[str, int]:
    """Bytes of each file the build has written so far (into its staging sibling of `out`, or `out`)."""
    written = {}
    for folder in [out, *out.parent.glob(f".{out.name}.partial-*")]:
        if folder.is_dir():
            written.update({path.relative_to(folder).as_posix(): path.stat().st_size
                            for path in folder.rglob("*") if path.is_file()})
    return written


def run_build(command: list[str], out: Path, time_limit: float | None = None) -> dict:
    """Run `command`; returns wall time, peak RSS, exit status, step times and the output tail.
    Past `time_limit` seconds, or on SIGTERM / SIGINT here, the build gets SIGINT (it then removes
    its partial output) and the result says where it stopped."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = {}

    def stop(reason: str) -> None:
        if not stopped and child.poll() is None:
            stopped.update(reason=reason, after_s=round(time.perf_counter() - start, 2),
                           files_written=partial_files(out))
            child.send_signal(signal.SIGINT)

    timer = threading.Timer(time_limit, stop, args=(f"--time-limit {time_limit:g} s",)) if time_limit else None
    if timer:
        timer.daemon = True
        timer.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop(f"signal {signal.Signals(number).name}"))
    steps, lines = [], []
    for line in child.stderr:  # progress lines arrive as the build goes
        now = time.perf_counter() - start
        lines.append(line.rstrip())
        print(f"{now:9.2f} {line.rstrip()}", file=sys.stderr, flush=True)
        match = STEP_LINE.match(line.strip())
        if match:
            steps.append({"step": match.group(3), "started_s": round(now, 2)})
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if timer:
        timer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    for step, following in zip(steps, steps[1:] + [{"started_s": round(wall, 2)}]):
        step["seconds"] = round(following["started_s"] - step["started_s"], 2)
    if stopped and steps:
        steps[-1]["unfinished"] = True  # its seconds run to the interruption
    result = {"exit_status": child.returncode, "wall_s": round(wall, 2),
              "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports kilobytes
              "user_cpu_s": round(usage.ru_utime, 2), "system_cpu_s": round(usage.ru_stime, 2),
              "steps": steps, "stdout": stdout.strip().splitlines(), "stderr_tail": lines[-5:]}
    if stopped:
        result["stopped"] = stopped
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=tidar.BUNDLED_MODEL,
                        help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file to write")
    parser.add_argument("--name", default=None, help="label of the checkpoint in the result (default: its folder name)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="TensorRT-LLM checkpoint dtype (default: the checkpoint's)")
    parser.add_argument("--engine", choices=("auto", "skip", "require"), default="auto",
                        help="tidar-export build's --engine (default auto; skip: ONNX and TensorRT-LLM checkpoint only)")
    parser.add_argument("--keep", type=Path, default=None, help="write the export here and keep it")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="interrupt the build after this many seconds and record where it stopped")
    args = parser.parse_args()

    export_cli = [sys.executable, "-m", "tidar.export.cli"]
    scratch = None if args.keep else tempfile.mkdtemp(prefix="tidar-export-bench-")
    out = args.keep or Path(scratch) / "out"
    command = [*export_cli, "build", str(args.checkpoint), "-o", str(out), "--force", "--tp", str(args.tp),
               "--engine", args.engine] + (["--dtype", args.dtype] if args.dtype else [])
    try:
        measured = run_build(command, out, args.time_limit)
        output_bytes = folder_size(out) if out.is_dir() else None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    paths = {str(out): "OUT", str(out.parent): "OUT_PARENT", str(args.checkpoint): "CHECKPOINT"}
    measured["stdout"] = [anonymous(line, paths) for line in measured["stdout"]]
    measured["stderr_tail"] = [anonymous(line, paths) for line in measured["stderr_tail"]]
    checkpoint_bytes = folder_size(args.checkpoint)
    config = json.loads((args.checkpoint / "config.json").read_text())
    result = {
        "benchmark": "export_build",
        "checkpoint": args.name or args.checkpoint.name,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": anonymous(" ".join(["tidar-export", *command[len(export_cli):]]), paths),
        "model": {key: config.get(key) for key in ("model_type", "hidden_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads",
                                                   "intermediate_size", "vocab_size", "torch_dtype")},
        "checkpoint_bytes": checkpoint_bytes,
        "output_bytes": output_bytes,
        **measured,
        "peak_rss_over_checkpoint": round(measured["peak_rss_bytes"] / checkpoint_bytes, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("checkpoint", "exit_status", "wall_s", "peak_rss_bytes",
                                                   "checkpoint_bytes", "peak_rss_over_checkpoint")}))
    return 0 if measured["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

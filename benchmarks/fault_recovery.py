"""Fault-recovery benchmark of `tidar serve`: how fast a dead model process is noticed and served again.

Per trial, a fresh `tidar serve` (the CLI, default restart policy) on a rendered repository for
MODEL (default: the bundled checkpoint on the torch backend with its default adaptive draft
length, so each start runs the start-up autotune as a deployment does): greedy outputs of a few
prompts are taken, STREAMS long streaming requests (`tidar.client.request`) are started, and once
every stream has received text the model process (Triton's Python-backend stub) is SIGKILLed.
Measured from the kill, on this machine's clock:
  streams_ended_s   the last in-flight stream ending with an error       (goal <= 10 s)
  unready_s         first poll (every 50 ms) where /v2/health/ready or
                    /v2/models/tidar/ready is not 200                    (goal <= 5 s)
  serving_again_s   both endpoints 200 again                             (goal <= 60 s)
  first_answer_s    a greedy request sent then has its whole answer
plus whether readiness stayed false from unready_s to serving_again_s, the errors the streams
got, and whether the greedy outputs after recovery equal those before. Reports the median over
--trials; writes OUT/fault_recovery.json and prints one line per trial.

    python benchmarks/fault_recovery.py -o OUT                      # 5 trials, 4 streams
    python benchmarks/fault_recovery.py --backend onnxruntime --model EXPORT_OUT -o OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import tidar
from tidar.client import ClientError, request
from tidar.export.triton_repo import render_repository
from tidar.serve import model_processes

PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Config:\n    def __init__(self", "for key, value in"]


def ready(http_url: str) -> bool:
    for path in ("/v2/health/ready", "/v2/models/tidar/ready"):
        try:
            with urllib.request.urlopen(http_url + path, timeout=1) as response:
                if response.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
    return True


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def trial(repo: Path, streams: int, max_tokens: int) -> dict:
    serve = subprocess.Popen([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port", "0",
                              "--http-port", "0", "--metrics-port", "0"], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in serve.stderr), daemon=True)
    reader.start()
    try:
        started = time.monotonic()
        while not any(line.startswith("ready:") for line in lines):
            if serve.poll() is not None or time.monotonic() - started > 600:
                raise SystemExit(f"tidar serve did not become ready: {lines}")
            time.sleep(0.1)
        ready_line = next(line for line in lines if line.startswith("ready:"))
        grpc_url = re.search(r"gRPC (\S+)", ready_line).group(1)
        http_url = re.search(r"HTTP (\S+)", ready_line).group(1)
        before = [request(grpc_url, p, 16).token_ids for p in PROMPTS]

        received = [0] * streams
        ends: list = [None] * streams

        def stream(index: int):
            def on_text(_piece):
                received[index] += 1
            try:
                request(grpc_url, PROMPTS[index % len(PROMPTS)], max_tokens, on_text=on_text, draft_len=1)
                ends[index] = (time.monotonic(), "finished without an error")
            except ClientError as error:
                ends[index] = (time.monotonic(), str(error))

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
        for thread in threads:
            thread.start()
        while not all(received):
            time.sleep(0.01)
        server = next(p for p in children(serve.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver")
        stub = model_processes(server)[0].pid
        os.kill(stub, signal.SIGKILL)
        killed = time.monotonic()
        readiness = []
        while time.monotonic() - killed < 600:
            readiness.append((time.monotonic() - killed, ready(http_url)))
            if readiness[-1][1] and not all(ok for _, ok in readiness):
                break
            time.sleep(0.05)
        first_answer = None
        after = None
        if readiness[-1][1]:
            after = [request(grpc_url, p, 16).token_ids for p in PROMPTS]
            first_answer = time.monotonic() - killed
        for thread in threads:
            thread.join(60)
        unready = next((t for t, ok in readiness if not ok), None)
        back = readiness[-1][0] if readiness[-1][1] else None
        return {
            "streams_ended_s": max(end[0] for end in ends) - killed if all(ends) else None,
            "unready_s": unready,
            "serving_again_s": back,
            "first_answer_s": first_answer,
            "unready_until_serving": unready is not None and all(not ok for t, ok in readiness[:-1] if t >= unready),
            "stream_errors": sorted({end[1] for end in ends if end}),
            "same_greedy_output": after == before,
            "supervisor_log": [line for line in lines if " tidar serve: " in line],
        }
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(120)
        reader.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(tidar.BUNDLED_MODEL), help="checkpoint or export folder")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=1024, help="long enough to be in flight at the kill")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        repo = render_repository(Path(tmp) / "repo", model_dir=str(Path(args.model).resolve()), backend=args.backend)
        trials = []
        for index in range(args.trials):
            trials.append(trial(repo, args.streams, args.max_tokens))
            shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in trials[-1].items()
                     if k != "supervisor_log"}
            print(f"trial {index + 1}: {shown}", flush=True)

    def median(key):
        values = [t[key] for t in trials if t[key] is not None]
        return statistics.median(values) if len(values) == len(trials) else None

    keys = ("streams_ended_s", "unready_s", "serving_again_s", "first_answer_s")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": args.model, "backend": args.backend, "streams": args.streams, "trials": trials,
        "median": {key: median(key) for key in keys},
        "goals": {"streams_ended_s": 10, "unready_s": 5, "serving_again_s": 60},
        "all_unready_until_serving": all(t["unready_until_serving"] for t in trials),
        "all_same_greedy_output": all(t["same_greedy_output"] for t in trials),
    }
    (out / "fault_recovery.json").write_text(json.dumps(result, indent=2) + "\n")
    print("median:", {k: (round(v, 2) if v is not None else None) for k, v in result["median"].items()})


if __name__ == "__main__":
    main()

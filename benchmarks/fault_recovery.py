"""Fault-recovery benchmark of `tidar serve`: how fast a dead model process is noticed and served again.

One `tidar serve` (the CLI, default restart backoff of 1 s; `--stable-after 0`, so that every
fault is a first one and gets that backoff) on a repository rendered for MODEL (default: the
bundled checkpoint on the torch backend with its default adaptive draft length, so each start
runs the start-up autotune as a deployment does). Greedy outputs of a few prompts are taken;
then per trial STREAMS long streaming requests (`tidar.serving.client.request`) are started, and once
every stream has received text the model process (Triton's Python-backend stub) is SIGKILLed.
Variants, one after the other in one run: "cached" (as shipped: a restart reuses the start-up
autotune measurement) and, with --uncached-trials, "uncached" (TIDAR_AUTOTUNE_CACHE="": every
restart measures again, as before the cache existed).
Measured from the kill, on this machine's clock:
  streams_ended_s   the last in-flight stream ending with an error       (goal <= 10 s)
  unready_s         first poll (every 50 ms) where /v2/health/ready or
                    /v2/models/tidar/ready is not 200                    (goal <= 5 s)
  serving_again_s   both endpoints 200 again                             (goal <= 60 s)
  first_answer_s    a greedy request sent then has its whole answer
plus whether readiness stayed false from unready_s to serving_again_s, the errors the streams
got, and whether the greedy outputs after recovery equal those before. Reports the median over
--trials per variant; writes OUT/fault_recovery.json and prints one line per trial.

    python benchmarks/fault_recovery.py -o OUT --uncached-trials 2  # 5 + 2 trials, 4 streams
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
from tidar.serving.client import ClientError, request
from tidar.serving.repository import render_repository
from tidar.serving.serve import model_processes

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


class Served:
    """A `tidar serve` process and its endpoints."""

    def __init__(self, repo: Path, env: dict):
        self.process = subprocess.Popen([sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port", "0",
                                         "--http-port", "0", "--metrics-port", "0", "--stable-after", "0",
                                         "--max-restarts", "1000"], stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.process.stderr),
                                       daemon=True)
        self.reader.start()
        started = time.monotonic()
        while not any(line.startswith("ready:") for line in self.lines):
            if self.process.poll() is not None or time.monotonic() - started > 900:
                raise SystemExit(f"tidar serve did not become ready: {self.lines}")
            time.sleep(0.1)
        self.start_s = time.monotonic() - started
        ready_line = next(line for line in self.lines if line.startswith("ready:"))
        self.grpc_url = re.search(r"gRPC (\S+)", ready_line).group(1)
        self.http_url = re.search(r"HTTP (\S+)", ready_line).group(1)
        self.before = self.greedy()

    def greedy(self):
        return [request(self.grpc_url, p, 16).token_ids for p in PROMPTS]

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(120)
        self.reader.join(5)


def trial(served: Served, streams: int, max_tokens: int) -> dict:
    received = [0] * streams
    ends: list = [None] * streams

    def stream(index: int):
        def on_text(_piece):
            received[index] += 1
        try:
            request(served.grpc_url, PROMPTS[index % len(PROMPTS)], max_tokens, on_text=on_text, draft_len=1)
            ends[index] = (time.monotonic(), "finished without an error")
        except ClientError as error:
            ends[index] = (time.monotonic(), str(error))

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    while not all(received):
        time.sleep(0.01)
    server = next(p for p in children(served.process.pid)
                  if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver")
    stub = model_processes(server)[0].pid
    os.kill(stub, signal.SIGKILL)
    killed = time.monotonic()
    readiness = []
    while time.monotonic() - killed < 900:
        readiness.append((time.monotonic() - killed, ready(served.http_url)))
        if readiness[-1][1] and not all(ok for _, ok in readiness):
            break
        time.sleep(0.05)
    first_answer = after = None
    if readiness[-1][1]:
        after = served.greedy()
        first_answer = time.monotonic() - killed
    for thread in threads:
        thread.join(60)
    unready = next((t for t, ok in readiness if not ok), None)
    return {
        "streams_ended_s": max(end[0] for end in ends) - killed if all(ends) else None,
        "unready_s": unready,
        "serving_again_s": readiness[-1][0] if readiness[-1][1] else None,
        "first_answer_s": first_answer,
        "unready_until_serving": unready is not None and all(not ok for t, ok in readiness[:-1] if t >= unready),
        "stream_errors": sorted({end[1] for end in ends if end}),
        "same_greedy_output": after == served.before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(tidar.BUNDLED_MODEL), help="checkpoint or export folder")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--trials", type=int, default=5, help="kills with the autotune cache (as shipped)")
    parser.add_argument("--uncached-trials", type=int, default=0, help="kills without it, on a second server")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=1024, help="long enough to be in flight at the kill")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("streams_ended_s", "unready_s", "serving_again_s", "first_answer_s")
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = render_repository(Path(tmp) / "repo", model_dir=str(Path(args.model).resolve()), backend=args.backend)
        for name, count, env in (("cached", args.trials, dict(os.environ)),
                                 ("uncached", args.uncached_trials, dict(os.environ, TIDAR_AUTOTUNE_CACHE=""))):
            if not count:
                continue
            served = Served(repo, env)
            trials = []
            try:
                for index in range(count):
                    trials.append(trial(served, args.streams, args.max_tokens))
                    shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in trials[-1].items()}
                    print(f"{name} trial {index + 1}: {shown}", flush=True)
            finally:
                served.stop()
            medians = {}
            for key in keys:
                values = [t[key] for t in trials if t[key] is not None]
                medians[key] = statistics.median(values) if len(values) == len(trials) else None
            variants[name] = {"first_start_s": served.start_s, "trials": trials, "median": medians,
                              "supervisor_log": [line for line in served.lines if " tidar serve: " in line]}
            print(f"{name} median:", {k: (round(v, 2) if v is not None else None) for k, v in medians.items()},
                  flush=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": "bundled" if args.model == str(tidar.BUNDLED_MODEL) else args.model, "backend": args.backend, "streams": args.streams, "variants": variants,
        "goals": {"streams_ended_s": 10, "unready_s": 5, "serving_again_s": 60},
        "all_unready_until_serving": all(t["unready_until_serving"] for v in variants.values() for t in v["trials"]),
        "all_same_greedy_output": all(t["same_greedy_output"] for v in variants.values() for t in v["trials"]),
    }
    (out / "fault_recovery.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

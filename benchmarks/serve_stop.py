"""How long a served `tidar` model takes to stop after a run of finished requests (docs/design.md §6.1).

Renders a repository for the bundled model (torch, float32, AR), starts the real tritonserver,
sends --requests sequential 8-token streaming requests with tritonclient, then stops the server
(`TritonServer.stop`: SIGINT, SIGKILL after its 15 s grace) and prints the seconds and the exit
status. With --cancel-finished, each stream is closed with `cancel_requests=True` after its final
response (what tidar's client did before); without, it is closed without a cancel (what it does now).

    python benchmarks/serve_stop.py --requests 150 --runs 2 --cancel-finished
    python benchmarks/serve_stop.py --requests 150 --runs 2
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from tidar import BUNDLED_MODEL
from tidar.serving.client import build_inputs
from tidar.serving.repository import render_repository
from tidar.serving.serve import TritonServer


def finished_request(url: str, cancel_finished: bool) -> None:
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("tidar", build_inputs("import os\n", 8, True), enable_empty_final_response=True)
    while True:
        result, error = responses.get(timeout=60)
        if error is not None:
            raise RuntimeError(str(error))
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream(cancel_requests=cancel_finished)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cancel-finished", action="store_true")
    args = parser.parse_args()
    repo = render_repository(Path(tempfile.mkdtemp(prefix="tidar-serve-stop-")) / "repo", model_dir=str(BUNDLED_MODEL),
                             backend="torch", draft_len="0", dtype="float32", threads=1)
    for run in range(args.runs):
        server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0).start()
        try:
            for _ in range(args.requests):
                finished_request(server.grpc_url, args.cancel_finished)
        finally:
            started = time.monotonic()
            status = server.stop()
        print(json.dumps({"run": run, "requests": args.requests, "cancel_finished": args.cancel_finished,
                          "stop_seconds": round(time.monotonic() - started, 1), "status": status}), flush=True)


if __name__ == "__main__":
    main()

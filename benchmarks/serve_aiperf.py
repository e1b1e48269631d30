"""Serving benchmark with NVIDIA's AIPerf: TiDAR against AR through the OpenAI front.

For each variant (a `tidar-export build` output, optionally with the `tidar` code to serve it
from), backend (torch, onnxruntime) and mode (AR: a repository rendered with draft_len 0; TiDAR:
draft_len auto, the server's adaptive choice), this renders a Triton repository and starts
`tidar serve REPO --openai-port P`; every server is started first (one after the other, so the
start-up autotunes do not share the cores) and stays up. Then AIPerf (`aiperf profile`, the
`bench` extra) measures them interleaved: for each round, for each concurrency, every server in
turn (the order rotated from round to round), streaming completions of synthetic prompts of
--input-tokens tokens, --output-tokens new tokens, greedy (temperature 0), with the export's
tokenizer (offline). Per run it keeps AIPerf's TTFT, ITL, output tokens/s and tokens/s per user
(from profile_export_aiperf.json) and the exact command; the generated texts (AIPerf's
--export-outputs-json) are compared prompt by prompt with the AR server of the same variant and
backend, and with the first variant's torch AR: greedy decoding is lossless, so every TiDAR
output must equal AR's.

Goal ratios (median over rounds of output tokens/s, per variant and backend): AR at the highest
concurrency over AR at 1, TiDAR over AR at 1 and at the highest concurrency.

    python benchmarks/serve_aiperf.py --variant now=OUT -o benchmarks/results/serve_aiperf.json
    python benchmarks/serve_aiperf.py --variant old=OLD_OUT:OLD_SRC --variant new=OUT:NEW_SRC \\
        --backends onnxruntime --rounds 2 -o results.json

A variant is NAME=EXPORT[:SRC]: SRC is a folder holding a `tidar` package folder (e.g. a link
named tidar to a `git worktree` checkout of another commit), put first on PYTHONPATH of its
servers and of the rendered model file (Triton's Python stub does not read PYTHONPATH); without
it, the installed `tidar` serves.
Writes the JSON, a PNG beside it, and each run's AIPerf artifacts under --artifacts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MODES = {"ar": 0, "tidar": None}
"""Mode -> the repository's draft_len (None: auto, the server's adaptive draft length)."""
METRICS = {  # our name: (AIPerf's metric tag in profile_export_aiperf.json, unit)
    "ttft_ms": ("time_to_first_token", "ms"),
    "itl_ms": ("inter_token_latency", "ms"),
    "output_tokens_per_s": ("output_token_throughput", "tokens/sec"),
    "tokens_per_s_per_user": ("output_token_throughput_per_user", "tokens/sec/user"),
    "request_latency_ms": ("request_latency", "ms"),
    "output_tokens_per_request": ("output_sequence_length", "tokens"),
}


@dataclass
class Server:
    variant: str
    export: Path
    source: Path | None
    backend: str
    mode: str
    repo: Path | None = None
    ports: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None
    model: str = ""
    log: Path | None = None
    name: str = field(init=False)
    """variant/backend/mode: how the results name this server."""

    def __post_init__(self):
        self.name = f"{self.variant}/{self.backend}/{self.mode}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['openai']}"

    def env(self) -> dict:
        env = dict(os.environ)
        if self.source is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.source), env.get("PYTHONPATH")]))
        return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(server: Server, work: Path, threads: int, ready_timeout: float, checkpoint: Path) -> None:
    """Render the server's repository with its own `tidar` and start `tidar serve` on it; return
    once the OpenAI front answers /v1/models. The torch backend serves `checkpoint` (the export's
    source), the others the export."""
    server.repo = work / server.name.replace("/", "-") / "repo"
    server.repo.parent.mkdir(parents=True)
    draft_len = MODES[server.mode]
    render = ("from tidar.serving.repository import render_repository; import sys; "
              "render_repository(sys.argv[1], model_dir=sys.argv[2], backend=sys.argv[3], "
              "draft_len=None if sys.argv[4] == 'auto' else int(sys.argv[4]), threads=int(sys.argv[5]))")
    model_dir = checkpoint if server.backend == "torch" else server.export
    subprocess.run([sys.executable, "-c", render, str(server.repo), str(model_dir), server.backend,
                    "auto" if draft_len is None else str(draft_len), str(threads)],
                   env=server.env(), check=True)
    if server.source is not None:  # Triton's Python stub ignores PYTHONPATH: the model file puts SRC first itself
        model_file = server.repo / "tidar" / "1" / "model.py"
        model_file.write_text(f"import sys\nsys.path.insert(0, {str(server.source)!r})\n" + model_file.read_text())
    server.ports = {name: free_port() for name in ("grpc", "http", "metrics", "openai")}
    command = [sys.executable, "-c", "from tidar.cli import main; main()", "serve", str(server.repo),
               *(f"--{name}-port={port}" for name, port in server.ports.items())]  # older tidar: no --ready-timeout
    server.log = server.repo.parent / "serve.log"
    server.process = subprocess.Popen(command, env=server.env(), stdout=server.log.open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + ready_timeout + 60
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name}: tidar serve exited with {server.process.returncode}:\n"
                               f"{server.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/v1/models", timeout=2) as response:
                server.model = json.load(response)["data"][0]["id"]
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"{server.name}: the OpenAI front did not answer within {ready_timeout + 60:.0f} s")


def stop(server: Server) -> None:
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(2)  # SIGINT: tidar serve stops tritonserver and exits
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def aiperf_command(aiperf: str, server: Server, concurrency: int, requests: int, args, artifacts: Path) -> list[str]:
    return [aiperf, "profile", "--model", server.model, "--url", server.url, "--endpoint-type", "completions",
            "--streaming", "--tokenizer", str(server.export), "--isl", str(args.input_tokens), "--isl-stddev", "0",
            "--osl", str(args.output_tokens), "--osl-stddev", "0", "--use-legacy-max-tokens",
            "--extra-inputs", "temperature:0", "--concurrency", str(concurrency), "--request-count", str(requests),
            "--warmup-request-count", str(concurrency), "--random-seed", str(args.seed),
            "--num-dataset-entries", str(args.prompts), "--use-server-token-count",
            "--no-server-metrics", "--no-gpu-telemetry", "--ui-type", "none", "--export-outputs-json",
            "--artifact-dir", str(artifacts)]


def read_metrics(artifacts: Path) -> dict:
    """Our metrics from AIPerf's profiling phase (phases/profiling/profile_export_aiperf.json; the
    warm-up phase has its own): avg, p50, p90, p99 where AIPerf has them."""
    records = json.loads((artifacts / "phases" / "profiling" / "profile_export_aiperf.json").read_text())
    metrics = {}
    for ours, (tag, unit) in METRICS.items():
        record = records.get(tag)
        if record is None:
            continue
        metrics[ours] = {stat: record[stat] for stat in ("avg", "p50", "p90", "p99") if record.get(stat) is not None}
        metrics[ours]["unit"] = record.get("unit", unit)
    metrics["request_count"] = (records.get("request_count") or {}).get("avg")
    metrics["error_request_count"] = (records.get("error_request_count") or {}).get("avg") or 0
    return metrics


def read_outputs(artifacts: Path) -> dict[str, str]:
    """{prompt text: generated text} of the profiled requests: AIPerf's outputs.json
    (--export-outputs-json) names each request's conversation, inputs.json its prompt."""
    prompts = {entry["session_id"]: entry["payloads"][0]["prompt"]
               for entry in json.loads((artifacts / "inputs.json").read_text())["data"]}
    return {prompts[record["conversation_id"]]: record["response_text"]
            for record in json.loads((artifacts / "outputs.json").read_text())["data"]}


def without_machine_paths(text: str, names: dict[str, str]) -> str:
    """`text` with each path of `names` (this machine's folders: exports, checkouts, artifacts,
    executables) replaced by its name, longest first, so a result file names no local path."""
    for path in sorted(names, key=len, reverse=True):
        text = text.replace(path, names[path])
    return text


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict], servers: list[Server], concurrencies: list[int]) -> dict:
    """Medians over rounds per server and concurrency, and the goal ratios per variant and backend."""
    table = {}
    for server in servers:
        for c in concurrencies:
            mine = [r for r in runs if r["server"] == server.name and r["concurrency"] == c and "metrics" in r]
            if not mine:
                continue
            row = {key: median([r["metrics"][key]["avg"] for r in mine if key in r["metrics"]])
                   for key in ("output_tokens_per_s", "tokens_per_s_per_user", "ttft_ms", "itl_ms")}
            row["rounds"] = len(mine)
            row["errors"] = sum(r["metrics"].get("error_request_count") or 0 for r in mine)
            table[f"{server.name}@{c}"] = row
    goals = {}
    low, high = min(concurrencies), max(concurrencies)
    for variant, backend in sorted({(s.variant, s.backend) for s in servers}):
        def rate(mode, c):
            row = table.get(f"{variant}/{backend}/{mode}@{c}")
            return row and row["output_tokens_per_s"]

        def ratio(a, b):
            return round(a / b, 3) if a and b else None

        goals[f"{variant}/{backend}"] = {
            f"ar@{high} / ar@{low} (goal >= 4)": ratio(rate("ar", high), rate("ar", low)),
            f"tidar@{low} / ar@{low} (goal >= 1.5)": ratio(rate("tidar", low), rate("ar", low)),
            f"tidar@{high} / ar@{high} (goal >= 1.3)": ratio(rate("tidar", high), rate("ar", high)),
        }
    return {"medians": table, "goals": goals}


def plot(summary: dict, servers: list[Server], concurrencies: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("output_tokens_per_s", "output tokens/s"), ("tokens_per_s_per_user", "tokens/s per user"),
              ("itl_ms", "ITL (ms)"), ("ttft_ms", "TTFT (ms)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for axis, (key, label) in zip(axes, panels):
        for server in servers:
            points = [(c, summary["medians"].get(f"{server.name}@{c}", {}).get(key)) for c in concurrencies]
            points = [(c, v) for c, v in points if v is not None]
            if points:
                axis.plot(*zip(*points), marker="o", linestyle="-" if server.mode == "tidar" else "--",
                          label=server.name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrency")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=EXPORT[:SRC]",
                        help="a tidar-export build output to serve (repeatable; see above)")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--skip", nargs="*", default=[], metavar="VARIANT/BACKEND",
                        help="servers not to start, e.g. old/torch (a variant's backend left out)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests-per-user", type=int, default=4,
                        help="requests per concurrency slot and run (request count = this x concurrency, at least 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=64, help="synthetic prompts in AIPerf's dataset")
    parser.add_argument("--seed", type=int, default=0, help="AIPerf's --random-seed: the same prompts for every run")
    parser.add_argument("--checkpoint", type=Path, default=Path(__file__).resolve().parent.parent / "models"
                        / "tidar-stdlib-qwen2", help="what the torch backend serves: the exports' source checkpoint "
                        "(default: the bundled model)")
    parser.add_argument("--threads", type=int, default=0, help="the servers' intra-op threads (0: the server's default, half the CPUs)")
    parser.add_argument("--aiperf", default=shutil.which("aiperf") or "aiperf", help="the aiperf executable")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--artifacts", type=Path, default=None, help="AIPerf artifacts (default: a temporary folder)")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the JSON to write (the PNG goes beside it)")
    args = parser.parse_args(argv)

    servers = []
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        export, _, source = rest.partition(":")
        if not name or not export or not (Path(export) / "config.json").is_file():
            parser.error(f"--variant {spec!r}: expected NAME=EXPORT[:SRC] with a tidar-export build output as EXPORT")
        for backend in args.backends:
            for mode in args.modes:
                if f"{name}/{backend}" in args.skip:
                    continue
                servers.append(Server(name, Path(export).resolve(), Path(source).resolve() if source else None,
                                      backend, mode))
    work = Path(tempfile.mkdtemp(prefix="serve-aiperf-"))
    artifacts = args.artifacts or work / "aiperf"
    version = subprocess.run([args.aiperf, "--version"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "serve_aiperf", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "aiperf": version, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                       "python": platform.python_version()},
        "note": args.note, "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "artifacts", "variant")},
        "variants": {}, "servers": [], "runs": [],
    }
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        export, _, source = rest.partition(":")
        commit = None
        if source:
            head = subprocess.run(["git", "-C", str(Path(source) / "tidar"), "rev-parse", "HEAD"], capture_output=True,
                                  text=True)
            commit = head.stdout.strip() or None
        result["variants"][name] = {"export": export, "source": source or "installed tidar", "commit": commit}
    try:
        for server in servers:
            began = time.monotonic()
            print(f"starting {server.name} ...", flush=True)
            start(server, work, args.threads, args.ready_timeout, args.checkpoint)
            result["servers"].append({"server": server.name, "model": server.model, "url": server.url,
                                      "start_seconds": round(time.monotonic() - began, 1)})
        for round_ in range(args.rounds):
            order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
            for concurrency in args.concurrency:
                for server in order:
                    requests = max(8, args.requests_per_user * concurrency)
                    folder = artifacts / f"r{round_}-c{concurrency}-{server.name.replace('/', '-')}"
                    command = aiperf_command(args.aiperf, server, concurrency, requests, args, folder)
                    run = {"server": server.name, "variant": server.variant, "backend": server.backend,
                           "mode": server.mode, "concurrency": concurrency, "round": round_,
                           "aiperf_command": " ".join(shlex.quote(a) for a in command)}
                    done = subprocess.run(command, capture_output=True, text=True, cwd=work)
                    if done.returncode:
                        run["error"] = (done.stdout + done.stderr)[-2000:]
                    else:
                        run["metrics"] = read_metrics(folder)
                        run["outputs"] = read_outputs(folder)
                    result["runs"].append(run)
                    summary = run.get("metrics", {}).get("output_tokens_per_s", {}).get("avg")
                    print(f"round {round_} C={concurrency} {server.name}: "
                          f"{'failed' if 'error' in run else f'{summary:.1f} output tokens/s'}", flush=True)
    finally:
        for server in servers:
            stop(server)
    # Greedy is lossless: each TiDAR output equals its prompt's AR output.
    checks = {}
    reference_server = next((s.name for s in servers if s.mode == "ar"), None)
    for server in servers:
        texts = [r.get("outputs", {}) for r in result["runs"] if r["server"] == server.name]
        ar_name = f"{server.variant}/{server.backend}/ar"
        for against in {ar_name, reference_server} - {server.name, None}:
            reference = {}
            for r in result["runs"]:
                if r["server"] == against:
                    reference.update(r.get("outputs", {}))
            compared = mismatched = 0
            for outputs in texts:
                for prompt, text in outputs.items():
                    if prompt in reference:
                        compared += 1
                        mismatched += text != reference[prompt]
            checks[f"{server.name} vs {against}"] = {"compared": compared, "mismatches": mismatched}
    result["equal_to_ar"] = checks
    for run in result["runs"]:
        run["outputs"] = len(run.get("outputs", {}))  # counted; the texts are compared above
    result["summary"] = summarize(result["runs"], servers, args.concurrency)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(without_machine_paths(json.dumps(result, indent=1, default=str), {
        **{str(server.export): f"{server.variant.upper()}_EXPORT" for server in servers},
        **{str(server.source): f"{server.variant.upper()}_SRC" for server in servers if server.source},
        str(artifacts): "ARTIFACTS", str(work): "WORK", sys.executable: "python", args.aiperf: "aiperf",
        str(args.checkpoint.resolve()): "CHECKPOINT"}) + "\n")
    plot(result["summary"], servers, args.concurrency, args.output.with_suffix(".png"),
         f"AIPerf through the OpenAI front: {args.input_tokens}-token prompts, {args.output_tokens} new tokens, "
         f"greedy; median of {args.rounds} rounds. {args.note}")
    print(json.dumps({"goals": result["summary"]["goals"], "equal_to_ar": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults on the real server: `tidar serve` (the CLI, as a user runs it) supervising nvidia-pytriton's
tritonserver with the bundled model, driven with NVIDIA's tritonclient.

The model process (Triton's Python-backend stub) and tritonserver are SIGKILLed as an
out-of-memory kill would; the processes are found and checked through /proc here, independently
of the supervisor's own bookkeeping. The oracle for "identical after recovery" is the same
server's greedy output before the fault. Restart backoff is shortened for the tests.

The tests of one `tidar serve` process run in file order: a model-process kill mid-stream, then
two kills in a row (the second while the replacement is loading), then one kill too many.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tidar import BUNDLED_MODEL
from tidar.serving.client import build_inputs, request
from tidar.serving.repository import render_repository
from tidar.serving.serve import ModelProcessDied, ServeError, model_processes
from tidar.serving.supervisor import RESTARTS_ENV, RestartPolicy, Supervisor, describe_status, restarts_from_environment

PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Config:\n    def __init__(self", "for key, value in"]
STUB = "triton_python_backend_stub"


class ScriptedServer:
    """Stands in for TritonServer in the restart policy's tests (the real one is tested below):
    start() fails with the scripted errors first, and records the environment it was given."""

    def __init__(self, *failures: Exception):
        self.failures, self.env, self.log_file, self.workdir = list(failures), {}, "server.log", Path("work")
        self.started_with, self.kills = [], 0

    def start(self, cancelled=lambda: False):
        self.started_with.append(restarts_from_environment(self.env))
        if self.failures:
            raise self.failures.pop(0)

    def kill(self):
        self.kills += 1


def supervised(server, **policy):
    import io

    log = io.StringIO()
    return Supervisor(server, RestartPolicy(backoff=0, **policy), poll=0.001, log=log), log


def test_backoff_doubles_up_to_its_cap_and_bad_values_are_refused():
    assert [RestartPolicy(backoff=1, max_backoff=30).delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert RestartPolicy(backoff=0).delay(5) == 0
    with pytest.raises(ValueError, match="must be >= 0"):
        RestartPolicy(max_restarts=-1)


def test_restarts_in_a_row_give_up_and_a_stable_server_starts_a_new_row():
    server = ScriptedServer()
    supervisor, log = supervised(server, max_restarts=2, stable_after=60)
    assert supervisor.recover("model_process", "model process tidar_0_0 (pid 7) killed by signal 9 (SIGKILL)")
    assert supervisor.recover("tritonserver", "tritonserver (pid 6) exited with status 1")
    assert not supervisor.recover("model_process", "model process tidar_0_0 (pid 9) killed by signal 9 (SIGKILL)")
    assert server.kills == 3 and len(server.started_with) == 2
    # each new server is told the restarts so far (the metric's value)
    assert server.started_with == [{"model_process": 1, "tritonserver": 0}, {"model_process": 1, "tritonserver": 1}]
    lines = log.getvalue().splitlines()
    assert "fault: model process tidar_0_0 (pid 7) killed by signal 9 (SIGKILL)" in lines[0]
    assert "restart 1 of at most 2 in a row" in lines[1] and "serving again" in lines[2]
    assert "giving up: 2 restarts in a row did not last (--max-restarts 2)" in lines[-1]
    assert "(pid 9)" in lines[-1]
    stable = ScriptedServer()
    supervisor, _ = supervised(stable, max_restarts=1, stable_after=60)
    assert supervisor.recover("model_process", "first")
    supervisor.serving_since -= 61  # it served for a minute
    assert supervisor.recover("model_process", "second") and len(stable.started_with) == 2


def test_a_failed_restart_is_the_next_fault_with_its_cause():
    server = ScriptedServer(ModelProcessDied("a model process (pid 5) killed by signal 9 (SIGKILL) while loading"),
                            ServeError("tritonserver exited with status 1 while starting:\nlog tail"))
    supervisor, log = supervised(server, max_restarts=3)
    assert supervisor.recover("tritonserver", "tritonserver (pid 4) killed by signal 9 (SIGKILL)")
    assert supervisor.restarts == {"model_process": 1, "tritonserver": 2} and len(server.started_with) == 3
    assert "fault: restart failed: tritonserver exited with status 1 while starting (log: server.log)" in log.getvalue()
    assert supervisor.recover("model_process", "again") is False  # a fourth restart in a row


def test_restart_counts_travel_through_the_environment():
    assert restarts_from_environment({}) == {"model_process": 0, "tritonserver": 0}
    assert restarts_from_environment({RESTARTS_ENV: '{"model_process": 2, "tritonserver": 1}'}) == {
        "model_process": 2, "tritonserver": 1}
    assert restarts_from_environment({RESTARTS_ENV: "not json"}) == {"model_process": 0, "tritonserver": 0}
    assert describe_status(-9) == "killed by signal 9 (SIGKILL)" and describe_status(3) == "exited with status 3"
    assert describe_status(11, waitpid_form=True) == "killed by signal 11 (SIGSEGV)"
    assert describe_status(1 << 8, waitpid_form=True) == "exited with status 1"


def test_a_restarted_model_reuses_the_start_up_autotune(tiny_checkpoints, tmp_path, monkeypatch):
    from tidar.runtime import autotune
    from tidar.serving.options import ServingOptions
    from tidar.serving.requests import build_scheduler
    from tidar.serving.supervisor import AUTOTUNE_CACHE_ENV

    options = ServingOptions(draft_len=None, autotune_batch_sizes=(1, 2), autotune_draft_lens=(0, 2), autotune_repeats=1,
                             attention="eager")
    monkeypatch.setenv(AUTOTUNE_CACHE_ENV, str(tmp_path / "autotune"))
    first = build_scheduler(tiny_checkpoints["qwen2"], options)[0]
    first.close()
    assert len(list((tmp_path / "autotune").glob("autotune-*.json"))) == 1

    def measure(*_args, **_kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune.BatchDraftPolicy, "measure", classmethod(measure))
    again = build_scheduler(tiny_checkpoints["qwen2"], options)[0]
    again.close()
    assert again.policy == first.policy and again.policy.step_seconds[2][(0, 0)] > 0  # AR: always timed
    with pytest.raises(AssertionError, match="measured again"):  # other options: measured anew
        build_scheduler(tiny_checkpoints["qwen2"], dataclasses.replace(options, autotune_draft_lens=(0, 1)))


def process_table() -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, state letter, argv[0])} of every process, from /proc/PID/status."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        table[int(entry)] = (int(fields["PPid"]), fields["State"].split()[0], argv0)
    return table


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for a parent to reap it, has ended)."""
    entry = process_table().get(pid)
    return entry is not None and entry[1] != "Z"


def descendants(pid: int) -> list[int]:
    table = process_table()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, state, _) in table.items() if ppid == parent and state != "Z"]
        found += children
        frontier += children
    return found


def children_named(pid: int, name: str) -> list[int]:
    return [p for p, (ppid, state, argv0) in process_table().items()
            if ppid == pid and state != "Z" and Path(argv0).name == name]


def shared_memory(pid: int) -> set[str]:
    """The Python backend's shared-memory files that process `pid` has mapped (present ones)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in re.findall(r"/dev/shm/(triton_python_backend_shm_region_\S+)", maps)
            if (Path("/dev/shm") / name).exists()}


def wait_for(condition, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


class Serve:
    """A `tidar serve` process: its stderr lines collected, its endpoints and processes found."""

    def __init__(self, repo: Path, *options: str, command: list[str] | None = None):
        argv = [sys.executable, "-m", "tidar.cli", "serve", str(repo), "--grpc-port", "0", "--http-port", "0",
                "--metrics-port", "0", "--restart-backoff", "0.2", *options]
        self.process = subprocess.Popen(argv + (["--", *command] if command else []), stderr=subprocess.PIPE,
                                        text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        ready = wait_for(lambda: [line for line in self.lines if line.startswith("ready:")], 240)
        assert ready, f"tidar serve was not ready: {self.lines}"
        self.grpc_url = re.search(r"gRPC (\S+)", ready[0]).group(1)
        self.http_url = re.search(r"HTTP (\S+)", ready[0]).group(1)
        self.metrics_url = re.search(r"metrics (\S+)", ready[0]).group(1)

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def tritonserver(self) -> int:
        pids = wait_for(lambda: children_named(self.process.pid, "tritonserver"), 10)
        assert pids and len(pids) == 1, f"tritonserver processes under tidar serve: {pids}"
        return pids[0]

    def stub(self, timeout: float = 10.0) -> int:
        server = self.tritonserver()
        # the tidar model's stub (the tensorrt_llm model has one of its own, which holds no weights)
        pids = wait_for(lambda: [p.pid for p in model_processes(server) if p.instance.startswith("tidar_")], timeout)
        assert pids and len(pids) == 1, f"tidar model processes under tritonserver {server}: {pids}"
        return pids[0]

    def ready(self) -> bool:
        return all(http_status(f"{self.http_url}{path}") == 200 for path in ("/v2/health/ready",
                                                                            "/v2/models/tidar/ready"))

    def restarts(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        return {cause: float(value) for cause, value in
                re.findall(r'tidar_server_restarts_total\{cause="(\w+)",model="tidar"[^}]*\} (\S+)', text)}

    def greedy(self) -> list[list[int]]:
        return [request(self.grpc_url, prompt, 16).token_ids for prompt in PROMPTS]

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.process.pid):
                    os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait()
        self.reader.join(5)


class Streams:
    """Long greedy streams on one gRPC connection each; when and how each one ended."""

    def __init__(self, url: str, count: int):
        self.clients, self.pieces, self.ends = [], [0] * count, [None] * count
        for index in range(count):
            client = grpcclient.InferenceServerClient(url)
            client.start_stream(callback=lambda result, error, i=index: self._on(i, result, error))
            client.async_stream_infer("tidar", build_inputs(PROMPTS[index % len(PROMPTS)], 2000, True, draft_len=1))
            self.clients.append(client)

    def _on(self, index, result, error):
        if error is not None:
            if self.ends[index] is None:
                self.ends[index] = (time.monotonic(), error)
        else:
            self.pieces[index] += 1

    def close(self):
        for client in self.clients:
            client.stop_stream(cancel_requests=True)  # a stream the server never ends must not hang here
            client.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return render_repository(tmp_path_factory.mktemp("faults") / "repo", model_dir=str(BUNDLED_MODEL),
                             backend="torch", dtype="float32", attention="eager", threads=1, draft_len="2")


@pytest.fixture(scope="module")
def served(repo):
    serve = Serve(repo, "--max-restarts", "3")
    serve.before = serve.greedy()
    yield serve
    serve.close()


def test_killed_model_process_ends_streams_turns_unready_and_recovers(served):
    streams = Streams(served.grpc_url, 4)
    readiness = []  # (seconds after the kill, both endpoints 200), polled until ready again
    try:
        assert wait_for(lambda: all(streams.pieces), 60), f"streams did not start: {streams.pieces}"
        stub = served.stub()
        assert served.ready()
        os.kill(stub, signal.SIGKILL)
        killed = time.monotonic()

        def poll():
            while time.monotonic() - killed < 180:
                readiness.append((time.monotonic() - killed, served.ready()))
                if readiness[-1][1] and not all(ok for _, ok in readiness):
                    return
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        assert wait_for(lambda: all(streams.ends), 10), f"in-flight streams still open 10 s after: {streams.ends}"
        assert wait_for(lambda: not all(ok for _, ok in readiness), 5), "readiness stayed 200 5 s after the kill"
        poller.join(180)
    finally:
        streams.close()
    for ended, error in streams.ends:
        assert ended - killed < 10 and error.status() == "StatusCode.UNAVAILABLE", (error.status(), error)
    unready = next(t for t, ok in readiness if not ok)
    assert readiness[-1][1], f"not serving again {readiness[-1][0]:.0f} s after the kill"
    assert all(not ok for t, ok in readiness[:-1] if t >= unready)  # no 200 before it serves again
    assert served.greedy() == served.before
    assert re.search(rf"fault: model process tidar_0_0 \(pid {stub}\) killed by signal 9 \(SIGKILL\)", served.log)
    assert not alive(stub) and served.restarts() == {"model_process": 1, "tritonserver": 0}


def test_killed_twice_in_a_row_recovers_with_identical_output(served):
    recoveries, before = served.log.count("serving again"), served.restarts()
    first = served.stub()
    server = served.tritonserver()
    os.kill(first, signal.SIGKILL)
    # the replacement model process, killed while it loads (a new tritonserver, a new stub)
    replacement = wait_for(lambda: [p for s in children_named(served.process.pid, "tritonserver") if s != server
                                    for p in children_named(s, STUB)], 120, step=0.01)
    assert replacement, served.log
    os.kill(replacement[0], signal.SIGKILL)
    assert wait_for(lambda: served.log.count("serving again") > recoveries and served.ready(), 240), served.log
    assert served.greedy() == served.before
    assert not alive(first) and not alive(replacement[0])
    restarts = {cause: count - before[cause] for cause, count in served.restarts().items()}
    assert sum(restarts.values()) == 2 and restarts["model_process"] >= 1, restarts  # the second may fail a start


def test_one_fault_too_many_gives_up_with_exit_1_and_leaves_nothing(served):
    for _ in range(4):  # with --max-restarts 3 the fourth fault in a row at the latest (one, after the tests above)
        recoveries = served.log.count("serving again")
        tree = [served.process.pid, *descendants(served.process.pid)]
        regions = shared_memory(served.tritonserver())
        assert regions
        os.kill(served.stub(), signal.SIGKILL)
        assert wait_for(lambda: served.process.poll() is not None or
                        served.log.count("serving again") > recoveries and served.ready(), 240), served.log
        if served.process.poll() is not None:
            break
    assert served.process.wait(30) == 1
    served.reader.join(5)
    assert "giving up: 3 restarts in a row did not last (--max-restarts 3)" in served.log
    assert wait_for(lambda: not any(alive(pid) for pid in tree), 10), [p for p in tree if alive(p)]
    assert not any((Path("/dev/shm") / name).exists() for name in regions), f"shared memory left: {regions}"


def test_killed_tritonserver_is_restarted_then_gives_up_ending_the_command(repo):
    """`tidar serve REPO -- COMMAND` with one restart allowed: a SIGKILLed tritonserver is
    restarted (serving again, same output); killed again, tidar serve exits 1 at once and
    ends COMMAND; no process of its tree is left."""
    serve = Serve(repo, "--max-restarts", "1", command=[sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        before = serve.greedy()
        first = serve.tritonserver()
        stub = serve.stub()
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: not alive(stub), 10), "the model process outlived its tritonserver"
        assert wait_for(lambda: "serving again" in serve.log and serve.ready(), 240), serve.log
        assert re.search(rf"fault: tritonserver \(pid {first}\) killed by signal 9 \(SIGKILL\)", serve.log)
        assert serve.greedy() == before and serve.restarts() == {"model_process": 0, "tritonserver": 1}
        tree = [serve.process.pid, *descendants(serve.process.pid)]
        # tidar serve, COMMAND, tritonserver, its two model processes (tidar, tensorrt_llm)
        assert len(tree) == 5, tree
        regions = shared_memory(serve.tritonserver())
        os.kill(serve.tritonserver(), signal.SIGKILL)
        assert serve.process.wait(30) == 1
        serve.reader.join(5)
        assert "giving up: 1 restarts in a row did not last" in serve.log
        assert wait_for(lambda: not any(alive(pid) for pid in tree), 10), [p for p in tree if alive(p)]
        assert regions and not any((Path("/dev/shm") / name).exists() for name in regions), regions
    finally:
        serve.close()


def test_a_server_that_dies_right_after_its_model_process_is_a_model_process_fault():
    """Triton may abort right after losing a stub; the stub's death, seen first, is the cause."""
    from types import SimpleNamespace

    class DyingServer:
        process = SimpleNamespace(pid=7, poll=lambda: -6)  # tritonserver: SIGABRT

        def __init__(self, stub_died):
            self.stub_died = stub_died

        def model_process_seen_dead(self):
            return self.stub_died

    stub = "model process tidar_0_0 (pid 9) killed by signal 9 (SIGKILL)"
    cause, what = supervised(DyingServer(stub))[0].fault()
    assert cause == "model_process" and what.startswith(f"{stub}, then tritonserver (pid 7) killed by signal 6")
    assert supervised(DyingServer(None))[0].fault() == ("tritonserver", f"tritonserver (pid 7) {describe_status(-6)}")

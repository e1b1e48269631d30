"""`tidar serve REPO`: run Triton Inference Server on a rendered model repository.

    with TritonServer(repo, grpc_port=8001, http_port=8000, metrics_port=8002) as server:
        ...  # server.grpc_url, server.metrics_url

Finds `tritonserver` (on PATH, or the one bundled in the `nvidia-pytriton` wheel), prepares a
backend folder whose Python backend runs this interpreter (the wheel's stub for this Python
version; PATH and LD_LIBRARY_PATH point at this environment, so the model imports `tidar`
and its dependencies from it), checks that the ports are free, starts the server, waits
until the models are ready and stops it cleanly (SIGINT, then SIGKILL after a grace period),
or kills it at once (`kill`: the process group, then the Python backend's shared-memory regions).
`model_processes` lists the server's live Python-backend stubs (the model processes) from /proc.
The server's log goes to a file (appended to across restarts); on a failed start its tail is
part of the error. `serve` runs it under `supervisor.Supervisor`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tidar.serving.options import OptionsError, ServingOptions
from tidar.serving.requests import STARTUP_PREFIX
from tidar.serving.supervisor import ModelProcessDied, RestartPolicy, ServeError, Supervisor, describe_status


def find_tritonserver() -> tuple[Path, Path | None, Path | None]:
    """(tritonserver binary, its Python backend folder, its stub for this Python) — from
    nvidia-pytriton when installed, else `tritonserver` on PATH with the backends of a standard
    install (/opt/tritonserver/backends)."""
    try:
        import pytriton
    except ImportError:
        pytriton = None
    if pytriton is not None:
        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            if not stub.is_file():
                raise ServeError(f"nvidia-pytriton has no Python backend stub for Python {version}")
            return binary, root / "backends" / "python", stub
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None, None
    raise ServeError("no Triton Inference Server found: install the serve extra "
                     "(`pip install -e \".[serve]\"`, which brings nvidia-pytriton's tritonserver) "
                     "or put `tritonserver` on PATH")


def check_repository(repo: Path) -> None:
    if not repo.is_dir():
        raise ServeError(f"{repo}: no such model repository")
    configs = list(repo.glob("*/config.pbtxt"))
    if not configs:
        raise ServeError(f"{repo}: not a model repository (no <model>/config.pbtxt)")
    for config in configs:
        text = config.read_text()
        if "${" in text:
            raise ServeError(f"{config}: an unrendered template; serve the repository that `tidar-export build` "
                             "writes to OUT/triton_repo")
        params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))
        if "model_dir" in params:  # a tidar model
            try:
                ServingOptions.from_parameters({"repository_format": "", **params}).check_format(str(config))
            except OptionsError as error:
                raise ServeError(str(error)) from None


API_KEY_ENV = "TIDAR_API_KEY"
"""Environment variable holding the OpenAI front's API key when `tidar serve` gets no --api-key
(vLLM's VLLM_API_KEY)."""


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    """Whether `port` can be bound on `host` (an IPv4 or IPv6 address or a host name)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all bound at once, so none comes back twice)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


STUB_NAME = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend_shm_region_"
ZOMBIE_GRACE = 0.5  # seconds a dead stub stays unreaped before it counts as a fault


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, pgrp, ...; see proc(5)), or None once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _zombie_status(fields: list[str] | None) -> str | None:
    """How a process ended, if `fields` (of _proc_stat) are a zombie's (its wait status is field
    52), else None: running, or gone (reaped)."""
    if fields is None or fields[0] != "Z":
        return None
    return describe_status(int(fields[49]), waitpid_form=True) if len(fields) >= 50 else "exited"


@dataclass(frozen=True)
class ModelProcess:
    """A Python-backend stub: pid, model instance name (e.g. tidar_0_0), shared-memory region."""

    pid: int
    instance: str
    shm_region: str

    def exit_status(self) -> str | None:
        """How it ended ('killed by signal 9 (SIGKILL)') while it is a zombie, else None."""
        return _zombie_status(_proc_stat(self.pid))


def _stub_children(server_pid: int) -> list[tuple[int, list[str]]]:
    """(pid, stat fields) of the server's children named like the stub (comm is cut to 15 characters)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and int(fields[1]) == server_pid:
                try:
                    comm = (entry / "comm").read_text().strip()
                except OSError:
                    continue
                if STUB_NAME.startswith(comm):
                    found.append((int(entry.name), fields))
    return found


def model_processes(server_pid: int) -> list[ModelProcess]:
    """The live Python-backend stubs of the server. Their arguments (the Python backend's stub
    launcher): stub, model.py, shm region, sizes, parent pid, lib dir, IPC handle, instance name, ..."""
    found = []
    for pid, fields in _stub_children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if fields[0] != "Z" and Path(argv[0]).name == STUB_NAME and len(argv) > 8:
            found.append(ModelProcess(pid, argv[8], argv[2]))
    return sorted(found, key=lambda process: process.instance)


DEFAULT_READY_TIMEOUT = 900.0
"""Seconds `tidar serve` waits for every model to be ready (`--ready-timeout`): a model's start-up
(loading, then the draft-shape autotune within its `autotune_budget`) takes minutes at billions
of parameters on a CPU."""


class TritonServer:
    """One tritonserver process on `repo`; a context manager. Port 0 picks a free port. While it
    starts, the models' start-up progress lines (requests.STARTUP_PREFIX) are shown on stderr."""

    def __init__(self, repo: str | Path, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
                 log_file: str | Path | None = None, verbose: bool = False,
                 ready_timeout: float = DEFAULT_READY_TIMEOUT):
        self.repo = Path(repo).resolve()
        check_repository(self.repo)
        spare = iter(free_ports(3))
        self.grpc_port, self.http_port, self.metrics_port = (p or next(spare) for p in (grpc_port, http_port,
                                                                                         metrics_port))
        for name, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            if not port_is_free(port):
                raise ServeError(f"{name} port {port} is already in use; choose another with "
                                 f"--{name.lower()}-port (or stop what listens there)")
        self.verbose, self.ready_timeout = verbose, ready_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="tidar-serve-"))  # removed by stop()
        self.log_file = Path(log_file) if log_file else self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}  # extra environment for the server (and its model processes)
        self._shm_regions: set[str] = set()
        self._seen: dict[int, ModelProcess] = {}  # this run's model processes, dead ones included
        self._zombie_since: dict[int, float] = {}
        self._seen_dead: dict[int, tuple[str, float]] = {}  # stubs seen as zombies: how they ended, when

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://localhost:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    def _command_and_env(self) -> tuple[list[str], dict[str, str]]:
        binary, python_backend, stub = find_tritonserver()
        command = [str(binary), "--model-repository", str(self.repo), f"--grpc-port={self.grpc_port}",
                   f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
                   "--allow-gpu-metrics=false", f"--log-verbose={1 if self.verbose else 0}"]
        env = dict(os.environ)
        if python_backend is not None:  # nvidia-pytriton: a backend folder with this Python's stub
            backends = self.workdir / "backends"
            shutil.copytree(python_backend, backends / "python", ignore=shutil.ignore_patterns("__pycache__"),
                            dirs_exist_ok=True)
            shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
            command.append(f"--backend-directory={backends}")
            libs = Path(binary).resolve().parents[2].parent / "nvidia_pytriton.libs"
            library_path = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
            env["LD_LIBRARY_PATH"] = ":".join(p for p in library_path if p)
        # The Python backend's stub finds its interpreter (and site-packages) through PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(self.env)
        return command, env

    def start(self, cancelled=lambda: False) -> "TritonServer":
        """Start and wait until every model is ready (ServeError otherwise, the server killed);
        may be called again after `kill` (a restart on the same ports)."""
        command, env = self._command_and_env()
        log = open(self.log_file, "ab")
        self._seen, self._zombie_since, self._seen_dead = {}, {}, {}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        shown = self.log_file.stat().st_size if self.log_file.is_file() else 0
        while time.monotonic() < deadline:
            shown = self._show_startup_lines(shown)
            if self.process.poll() is not None:
                raise ServeError(f"tritonserver exited with status {self.process.returncode} while starting:\n"
                                 f"{self.log_tail()}")
            died = self.dead_model_process()
            if died:  # Triton would wait for it for good
                self.kill()
                raise ModelProcessDied(f"{died} while the models were loading")
            if self._ready():
                self._seen_dead.clear()  # stubs Triton ended itself while loading (config auto-complete)
                self.model_processes()
                return self
            if cancelled():
                self.kill()
                raise ServeError("stopped while starting")
            time.sleep(0.25)
        self.kill()
        raise ServeError(f"tritonserver was not ready after {self.ready_timeout:.0f} s (the limit is "
                         f"--ready-timeout):\n{self.log_tail()}")

    def _show_startup_lines(self, offset: int) -> int:
        """Print the models' start-up lines the log gained past byte `offset`; returns the offset
        after the last whole line read."""
        try:
            with open(self.log_file, "rb") as log:
                log.seek(offset)
                chunk = log.read()
        except OSError:
            return offset
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].decode(errors="replace").splitlines():
            if STARTUP_PREFIX in line:
                print(line[line.index(STARTUP_PREFIX):], file=sys.stderr, flush=True)
        return offset + end

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def model_processes(self) -> list[ModelProcess]:
        """The server's live model processes (noted, with their shared-memory regions, for
        `dead_model_process` and `kill`)."""
        if self.process is None or self.process.poll() is not None:
            return []
        found = model_processes(self.process.pid)
        self._seen.update((process.pid, process) for process in found)
        self._shm_regions.update(process.shm_region for process in found)
        return found

    def dead_model_process(self, scan: bool = True, grace: float = ZOMBIE_GRACE) -> str | None:
        """'model process tidar_0_0 (pid N) killed by signal 9 (SIGKILL)' once one of this run's
        model processes has died, else None. A dead stub is one left unreaped for ZOMBIE_GRACE
        seconds: Triton reaps the stubs it ends itself (the model-level stub of config
        auto-completion, unloading) at once, but never one that died under it. Checks the stubs
        seen before (cheap); with `scan`, also looks through /proc for new and never-seen ones."""
        if self.process is None:
            return None
        if scan:
            self.model_processes()
        dead = {pid: (f"model process {process.instance} (pid {pid})", process.exit_status())
                for pid, process in self._seen.items()}
        for pid, fields in _stub_children(self.process.pid) if scan else ():
            dead.setdefault(pid, (f"a model process (pid {pid})", _zombie_status(fields)))
        now = time.monotonic()
        for pid, (name, status) in dead.items():
            if status is None:
                self._zombie_since.pop(pid, None)
                continue
            self._seen_dead.setdefault(pid, (f"{name} {status}", now))
            if now - self._zombie_since.setdefault(pid, now) >= grace:
                return self._seen_dead[pid][0]
        return None

    def model_process_seen_dead(self, within: float = 2.0) -> str | None:
        """A model process of this run seen dead in the last `within` seconds, even if it has been
        reaped since: when the server dies right after one of its stubs (Triton may abort on
        losing one), the stub's death is the fault's cause."""
        self.dead_model_process(scan=False, grace=0.0)
        now = time.monotonic()
        return next((what for what, seen in self._seen_dead.values() if now - seen <= within), None)

    def kill(self, wait: float = 10.0) -> int | None:
        """SIGKILL the server's process group (the server and its model processes; open
        connections close at once), wait for them, remove the Python backend's shared memory."""
        if self.process is None:
            return None
        self.model_processes()
        with contextlib.suppress(OSError):  # every stub's region is mapped by the server too
            maps = Path(f"/proc/{self.process.pid}/maps").read_text()
            self._shm_regions.update(re.findall(rf"/dev/shm/({SHM_PREFIX}\S+)", maps))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + wait
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for region in self._shm_regions:
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / region).unlink()
        self._shm_regions.clear()
        return self.process.returncode

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGINT (Triton unloads the models and exits), `kill` after `grace` seconds."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.model_processes()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        code = self.process.poll()
        self.kill()  # whatever is left of the group, and the shared memory
        code = self.process.returncode if code is None else code
        # The working folder goes, unless it holds the log of a server that did not exit cleanly.
        keep_log = self.log_file.parent == self.workdir and code != 0
        shutil.rmtree(self.workdir / "backends" if keep_log else self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies of the group (reaped by init later): count only live ones
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


def serve(repo: str | Path, grpc_port: int, http_port: int, metrics_port: int, command: list[str] | None = None,
          verbose: bool = False, policy=None, openai_port: int | None = None,
          ready_timeout: float = DEFAULT_READY_TIMEOUT, openai_host: str = "0.0.0.0",
          api_key: str | None = None) -> int:
    """Run the server until SIGINT/SIGTERM (0), supervised: a dead model process or server is
    restarted per `policy` (a supervisor.RestartPolicy), and 1 is returned once it gives up. With
    `command`, run it once the server is ready, stop the server when it ends and return its status. With
    `openai_port`, an OpenAI-compatible HTTP front (openai_front.py) on `openai_host` forwards to the
    `tidar` model over gRPC; with `api_key`, its /v1 routes need `Authorization: Bearer API_KEY`
    (the command gets OPENAI_BASE_URL, and OPENAI_API_KEY then, as the openai client reads them)."""

    if openai_port is not None:
        import tidar.serving.openai_front  # noqa: F401  (the openai extra; cli.py names it if missing, before any start)

        if openai_port != 0 and not port_is_free(openai_port, openai_host):
            raise ServeError(f"OpenAI port {openai_port} is already in use on {openai_host}")
    server = TritonServer(repo, grpc_port, http_port, metrics_port, verbose=verbose, ready_timeout=ready_timeout)
    supervisor = Supervisor(server, policy or RestartPolicy())
    front = None
    stop_requested = []
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        stop_requested.append(signum)

    def keep_going() -> bool:
        return not stop_requested and (child is None or child.poll() is None)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting tritonserver on {server.repo} (log: {server.log_file})", file=sys.stderr, flush=True)
        try:
            supervisor.start(cancelled=lambda: bool(stop_requested))
        except ServeError:
            if stop_requested:
                return 0
            raise
        endpoints = f"gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}"
        if openai_port is not None:
            front = _start_openai_front(server, openai_port, openai_host, api_key)
            endpoints += f"  OpenAI {front.url}"
        print(f"ready: {endpoints}", file=sys.stderr, flush=True)
        if command:
            env = dict(os.environ, TIDAR_GRPC_URL=server.grpc_url, TIDAR_METRICS_URL=server.metrics_url,
                       **({"OPENAI_BASE_URL": front.url} if front else {}),
                       **({"OPENAI_API_KEY": api_key} if front and api_key else {}),
                       PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
            child = subprocess.Popen(command, env=env)
        code = supervisor.run(keep_going)
        if child is None:
            return code
        if child.poll() is None:  # a stop was requested, or the supervisor gave up: the command ends too
            child.send_signal(stop_requested[0] if stop_requested else signal.SIGTERM)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        return child.wait() if code == 0 else code
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if front is not None:
            front.stop()
        code = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"tritonserver stopped (status {code})", file=sys.stderr, flush=True)


def _start_openai_front(server: TritonServer, port: int, host: str = "0.0.0.0", api_key: str | None = None):
    from tidar.serving.openai_front import OpenAIFront, model_dir_of  # the openai extra (cli.py names it if missing)

    try:
        return OpenAIFront(server.grpc_url, model_dir_of(server.repo), port=port, host=host, api_key=api_key).start()
    except OSError as exc:
        raise ServeError(f"cannot serve the OpenAI front on {host} port {port}: {exc.strerror or exc}") from None

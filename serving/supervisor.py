"""Supervision of a running tritonserver for `tidar serve`: notice a dead model process or a dead
server, end it, restart it with backoff, give up on a crash loop.

Why the whole server is restarted, not the model reloaded: when the Python backend's stub (the
model process, which holds the runtime) dies, Triton 2.51 keeps the decoupled model "ready" and
never ends its in-flight streams; a reload through the repository API (explicit model control)
loads a new stub but still leaves those streams hanging and both readiness endpoints at 200 (the
Python backend does not restart the stub of a decoupled model). Killing tritonserver's process
group closes every connection (clients see gRPC UNAVAILABLE at once) and its readiness
endpoints stop answering until the new server has loaded every model.

Faults are logged with their cause (one line each, on stderr) and counted; the counts reach
the new server in the environment variable RESTARTS_ENV, from which the model publishes them as
`tidar_server_restarts_total{cause}` (serving/triton_model.py). Kept free of heavy imports:
the model process imports this module.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO


class ServeError(RuntimeError):
    """The server cannot be started (no binary, a port taken, a repository that fails to load)."""


class ModelProcessDied(ServeError):
    """A model process of the server died (while it was loading its model, for `start`)."""


RESTARTS_ENV = "TIDAR_SERVER_RESTARTS"
# A folder where a model keeps its start-up autotune measurement for the restarts of one
# `tidar serve` (serving/requests.py): a restart then skips the measurement.
AUTOTUNE_CACHE_ENV = "TIDAR_AUTOTUNE_CACHE"
# The metric's `cause` label: a model process died, or tritonserver died (or failed to restart).
CAUSES = ("model_process", "tritonserver")


def restarts_from_environment(environ=os.environ) -> dict[str, int]:
    """{cause: restarts before this server} as `tidar serve` passed them (zeros without it)."""
    counts = dict.fromkeys(CAUSES, 0)
    try:
        given = json.loads(environ.get(RESTARTS_ENV, "{}"))
    except ValueError:
        return counts
    if isinstance(given, dict):
        counts.update({cause: int(given[cause]) for cause in CAUSES if isinstance(given.get(cause), int)})
    return counts


def describe_status(status: int, waitpid_form: bool = False) -> str:
    """'killed by signal 9 (SIGKILL)' / 'exited with status 1', from a Popen returncode or
    (waitpid_form) a raw wait status as /proc/PID/stat reports it for a zombie."""
    if waitpid_form:
        if os.WIFSIGNALED(status):
            status = -os.WTERMSIG(status)
        else:
            status = os.WEXITSTATUS(status)
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "?"
        return f"killed by signal {-status} ({name})"
    return f"exited with status {status}"


@dataclass(frozen=True)
class RestartPolicy:
    """Restart after `backoff` seconds, doubled for each further restart in a row (at most
    `max_backoff`); give up after `max_restarts` restarts in a row. A server that served for
    `stable_after` seconds before its fault starts a new row."""

    max_restarts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    stable_after: float = 60.0

    def __post_init__(self):
        if self.max_restarts < 0 or self.backoff < 0 or self.max_backoff < 0 or self.stable_after < 0:
            raise ValueError(f"restart policy values must be >= 0: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number `attempt` (1-based) of a row."""
        return min(self.backoff * 2 ** (attempt - 1), max(self.max_backoff, self.backoff))


class Supervisor:
    """Watches `server` (a serve.TritonServer) and its model processes; on a fault kills what is
    left of the server and starts it again on the same ports, per `policy`."""

    def __init__(self, server, policy: RestartPolicy = RestartPolicy(), poll: float = 0.1, scan_every: float = 2.0,
                 log: TextIO | None = None):
        """Every `poll` seconds the server and its known model processes are checked; every
        `scan_every` seconds /proc is searched for new or never-seen dead model processes."""
        self.server, self.policy, self.poll, self.scan_every = server, policy, poll, scan_every
        self.next_scan = 0.0
        self.log_stream = log
        self.restarts = dict.fromkeys(CAUSES, 0)
        self.in_a_row = 0
        self.serving_since: float | None = None

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"{stamp} tidar serve: {message}", file=self.log_stream or sys.stderr, flush=True)

    def start(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Start the server (ServeError if it does not become ready) and watch its model processes."""
        self.server.env[RESTARTS_ENV] = json.dumps(self.restarts)
        # kept across restarts; TIDAR_AUTOTUNE_CACHE="" in the environment turns it off
        self.server.env.setdefault(AUTOTUNE_CACHE_ENV, os.environ.get(AUTOTUNE_CACHE_ENV,
                                                                      str(self.server.workdir / "autotune")))
        self.server.start(cancelled=cancelled)
        self.serving_since = time.monotonic()

    def fault(self) -> tuple[str, str] | None:
        """(cause, description) of a fault of the running server, or None while it is healthy."""
        stub_died = self.server.model_process_seen_dead()  # looked at before the server: see its docstring
        code = self.server.process.poll()
        if code is not None:
            server_died = f"tritonserver (pid {self.server.process.pid}) {describe_status(code)}"
            if stub_died:
                return "model_process", f"{stub_died}, then {server_died}"
            return "tritonserver", server_died
        scan = time.monotonic() >= self.next_scan
        if scan:
            self.next_scan = time.monotonic() + self.scan_every
        died = self.server.dead_model_process(scan=scan)
        return ("model_process", died) if died else None

    def run(self, keep_going: Callable[[], bool]) -> int:
        """Watch and recover while keep_going(); 0 when it says stop, 1 after giving up."""
        while keep_going():
            fault = self.fault()
            if fault is None:
                time.sleep(self.poll)
            elif not self.recover(*fault, keep_going=keep_going):
                return 1
        return 0

    def recover(self, cause: str, what: str, keep_going: Callable[[], bool] = lambda: True) -> bool:
        """Kill the server, restart it (again while restarts fail); False once the policy gives up."""
        began = time.monotonic()
        self.log(f"fault: {what}; stopping tritonserver (its in-flight requests end)")
        self.server.kill()
        if self.serving_since is not None and began - self.serving_since >= self.policy.stable_after:
            self.in_a_row = 0
        self.serving_since = None
        while keep_going():
            if self.in_a_row >= self.policy.max_restarts:
                self.log(f"giving up: {self.in_a_row} restarts in a row did not last "
                         f"(--max-restarts {self.policy.max_restarts}); last fault: {what}")
                return False
            self.in_a_row += 1
            self.restarts[cause] += 1
            delay = self.policy.delay(self.in_a_row)
            self.log(f"restart {self.in_a_row} of at most {self.policy.max_restarts} in a row in {delay:.1f} s "
                     f"(cause: {cause}; restarts so far: {self.restarts})")
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and keep_going():
                time.sleep(min(self.poll, max(deadline - time.monotonic(), 0)))
            if not keep_going():
                break
            try:
                self.start(cancelled=lambda: not keep_going())
            except Exception as error:  # noqa: BLE001 - any failed start is the next fault
                self.server.kill()
                if not keep_going():  # stopped while starting
                    break
                cause = "model_process" if isinstance(error, ModelProcessDied) else "tritonserver"
                what = f"restart failed: {str(error).splitlines()[0].rstrip(':')} (log: {self.server.log_file})"
                self.log(f"fault: {what}")
                continue
            self.log(f"serving again {time.monotonic() - began:.1f} s after the fault")
            return True
        return True

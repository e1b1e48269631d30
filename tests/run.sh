#!/usr/bin/env bash
# The project's test command (the README's): make .venv if needed, install, run pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k layout`. Two worker processes by default
# (TIDAR_TEST_WORKERS; 0 runs in-process), each test file on one worker so module fixtures (a
# server, an export) are made once: most tests are single-threaded Python around tiny models or
# wait on a subprocess, so two workers use a 2-core machine about twice as well.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest -q -n "${TIDAR_TEST_WORKERS:-2}" --dist loadfile "$@"

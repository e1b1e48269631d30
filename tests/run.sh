#!/usr/bin/env bash
# The project's test command (the README's): make .venv if needed, install, run pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k layout`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest -q "$@"

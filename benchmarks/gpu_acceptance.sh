#!/usr/bin/env bash
# GPU acceptance of tidar-trt on one H100/H200 (< 8 minutes): see benchmarks/gpu_acceptance.py.
# Exit 0: every check passed; 1: a mismatch (see the JSON); 2: no CUDA here (nothing run).
# PYTHON selects the interpreter that has tidar installed (default: python3).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_acceptance.py" "$@"

#!/usr/bin/env bash
# The README's test command (and CI's): set up the CPU environment, lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"

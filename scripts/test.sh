#!/usr/bin/env bash
# Sets up .venv with the test tools, then runs lint, type checks and the whole suite
# (slow tests included). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh --test
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
bash scripts/ensure_postgres.sh
.venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Sets up .venv at the repo root. `--test` adds the test tools (pytest, transformers,
# ruff, mypy). Safe to re-run: an existing venv is reused and only updated.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
EXTRAS=""
[ "${1:-}" = "--test" ] && EXTRAS="[test]"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: a CPU build of 2.13.0 lies on this machine's disk, and any
# other spec would make pip download a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q torch==2.13.0
fi
if ! .venv/bin/pip install -q -e ".${EXTRAS}" >.venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log
  echo "setup failed: pip could not install ember${EXTRAS}; see the log above" >&2
  exit 1
fi
# Byte-compile Ember's packages, as pip does for a regular install (an editable one
# compiles nothing): where bytecode is not written as modules are imported
# (PYTHONDONTWRITEBYTECODE), every new worker would compile them again, ~40 ms of its
# cold start on the 2-core machines.
.venv/bin/python -m compileall -q -j 0 sdk billing core functions kv_tier platform warmpool \
  weights_store >/dev/null
.venv/bin/python -c "import ember_functions, torch; print('ember ready; torch', torch.__version__)"

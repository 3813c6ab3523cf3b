#!/usr/bin/env bash
# Installs the weights bench's extra peer, runai-model-streamer (local files and S3), into
# Ember's own .venv: it needs only torch, numpy and boto3, which are there already.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install --quiet "runai-model-streamer[s3]==0.17.1"
.venv/bin/python -c "import runai_model_streamer; print('runai-model-streamer ready')"

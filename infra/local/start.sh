#!/usr/bin/env bash
# Start the local stack: SeaweedFS S3 on 127.0.0.1 (keys generated into FOLDER, never printed) and
# an MLflow server (SQLite store, S3 artifacts). Prints the environment block to `source`.
#   infra/local/start.sh [FOLDER]        (default .stack)
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PIPELINE_PYTHON:-$here/.venv/bin/python}"
exec "$py" -m pipeline.ops.local_services start "${1:-.stack}"

#!/usr/bin/env bash
# Stop the local stack started by start.sh (by the PIDs it recorded).
#   infra/local/stop.sh [FOLDER]         (default .stack)
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PIPELINE_PYTHON:-$here/.venv/bin/python}"
exec "$py" -m pipeline.ops.local_services stop "${1:-.stack}"

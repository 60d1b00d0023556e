#!/usr/bin/env bash
# Join a worker node to the cluster started by deploy/start-head.sh:
#   RAY_AUTH_TOKEN=... deploy/start-worker.sh HEAD_IP:6379
# Uses every CPU and GPU of this machine; each GPU gets its own shared prior server on demand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ $# -ne 1 ]; then
  echo "usage: RAY_AUTH_TOKEN=TOKEN $0 HEAD_IP:PORT" >&2
  exit 2
fi
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  echo "$0: set RAY_AUTH_TOKEN to the token deploy/start-head.sh printed" >&2
  exit 2
fi
export RAY_AUTH_MODE=token
exec "$VENV/bin/ray" start --address="$1"

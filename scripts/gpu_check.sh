#!/usr/bin/env bash
# The GPU check, one command, on a bare GPU machine or a developer's: every part of
# rf_bench.gpu_check (<= 9 minutes on one H100/H200), its report in $GPU_CHECK_OUT
# (gpu_check.json, .md and .log, rewritten after each part).
#
# Uses the machine's own python and torch. Where diffusers does not import, the wheels in
# .whl/ (scripts/gpu_wheels.sh) are installed into a folder of their own, without their
# dependencies, and put first on PYTHONPATH: the machine's torch and packages stay as they are.
# Usage: bash scripts/gpu_check.sh [--budget S] [--parts a,b] [--cpu-smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT=${GPU_CHECK_OUT:-outputs/gpu_check}
if ! "$PYTHON" -c "import diffusers" >/dev/null 2>&1; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu-check: error: diffusers does not import and $WHEELS/ holds no wheels; run" \
         "bash scripts/gpu_wheels.sh where pip reaches PyPI and bring $WHEELS/ along" >&2
    exit 2
  fi
  SITE=${GPU_CHECK_SITE:-/tmp/rf-gpu-site}
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m rf_bench.gpu_check --out "$OUT" "$@"

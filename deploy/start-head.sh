#!/usr/bin/env bash
# Start the head of a Ray cluster for `rf sweep` / `rf dataset`, plus an MLflow tracking server.
#   deploy/start-head.sh            (from the project folder, with .venv installed: `make install`)
# Prints the two lines to run on each worker node and the driver's flags.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${RAY_PORT:-6379}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
HEAD_IP=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
export RAY_AUTH_MODE=token
# One shared secret for every node and the driver (Ray >= 2.52 token authentication).
TOKEN=${RAY_AUTH_TOKEN:-$("$VENV/bin/ray" get-auth-token --generate 2>/dev/null | tail -n 1)}
export RAY_AUTH_TOKEN=$TOKEN
# The head runs the driver and MLflow: no reconstruction tasks (num-cpus 0 keeps them off it).
"$VENV/bin/ray" start --head --port="$PORT" --node-ip-address="$HEAD_IP" --num-cpus=0 \
  --num-gpus=0 --include-dashboard=false
mkdir -p outputs/mlflow
nohup "$VENV/bin/mlflow" server --host 0.0.0.0 --port "$MLFLOW_PORT" \
  --backend-store-uri "sqlite:///$PWD/outputs/mlflow/mlflow.db" \
  --artifacts-destination "$PWD/outputs/mlflow/artifacts" --serve-artifacts \
  > outputs/mlflow/server.log 2>&1 &
cat <<MSG

Ray head at $HEAD_IP:$PORT, MLflow at http://$HEAD_IP:$MLFLOW_PORT
On every worker node (same project version and .venv):
  RAY_AUTH_TOKEN=$TOKEN deploy/start-worker.sh $HEAD_IP:$PORT
Then, here:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$TOKEN
  $VENV/bin/rf dataset DATA --out outputs/datasets/NAME --address $HEAD_IP:$PORT \\
      --tracking-uri http://$HEAD_IP:$MLFLOW_PORT --gpus-per-object 0.25
Stop with: $VENV/bin/ray stop (on each node)
MSG

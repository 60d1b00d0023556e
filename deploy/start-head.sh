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
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
case "$MLFLOW_HOST" in 127.0.0.1|localhost|::1) ;; *)
  "$VENV/bin/python" -c "import flask_wtf" 2>/dev/null || {
    echo "start-head.sh: MLFLOW_HOST=$MLFLOW_HOST exposes MLflow, which then needs its basic-auth app: $VENV/bin/pip install -e '.[auth]'" >&2
    exit 2; } ;;
esac
export RAY_AUTH_MODE=token
# One shared secret for every node and the driver (Ray >= 2.52 token authentication).
TOKEN=${RAY_AUTH_TOKEN:-$("$VENV/bin/ray" get-auth-token --generate 2>/dev/null | tail -n 1)}
export RAY_AUTH_TOKEN=$TOKEN
# The head runs the driver and MLflow: no reconstruction tasks (num-cpus 0 keeps them off it).
"$VENV/bin/ray" start --head --port="$PORT" --node-ip-address="$HEAD_IP" --num-cpus=0 \
  --num-gpus=0 --include-dashboard=false
# MLflow: only the driver (on this head) writes to it, so by default it listens on loopback
# only; open the UI from your laptop with `ssh -L 5000:127.0.0.1:5000 HEAD`. Set
# MLFLOW_HOST=0.0.0.0 (or an interface IP) to expose it: then MLflow's basic-auth app guards
# every request, with an admin password from MLFLOW_AUTH_ADMIN_PASSWORD or a generated one.
umask 077  # the store, the auth database and the logs are readable by this user only
mkdir -p outputs/mlflow && chmod 700 outputs/mlflow
AUTH=()
CREDS=""
case "$MLFLOW_HOST" in
  127.0.0.1|localhost|::1) ;;
  *)
    PASSWORD=${MLFLOW_AUTH_ADMIN_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}
    cat > outputs/mlflow/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$PWD/outputs/mlflow/auth.db
admin_username = admin
admin_password = $PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH=$PWD/outputs/mlflow/basic_auth.ini
    export MLFLOW_FLASK_SERVER_SECRET_KEY=${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(head -c 32 /dev/urandom | base64)}
    AUTH=(--app-name basic-auth)
    CREDS="MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=$PASSWORD "
    ;;
esac
nohup "$VENV/bin/mlflow" server --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" "${AUTH[@]}" \
  --backend-store-uri "sqlite:///$PWD/outputs/mlflow/mlflow.db" \
  --artifacts-destination "$PWD/outputs/mlflow/artifacts" --serve-artifacts \
  > outputs/mlflow/server.log 2>&1 &
case "$MLFLOW_HOST" in 127.0.0.1|localhost|::1) MLFLOW_URI=http://127.0.0.1:$MLFLOW_PORT ;;
  *) MLFLOW_URI=http://$HEAD_IP:$MLFLOW_PORT ;; esac
cat <<MSG

Ray head at $HEAD_IP:$PORT, MLflow at $MLFLOW_URI (${AUTH:+basic auth, user admin; }listening on $MLFLOW_HOST)
On every worker node (same project version and .venv):
  RAY_AUTH_TOKEN=$TOKEN deploy/start-worker.sh $HEAD_IP:$PORT
Then, here:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$TOKEN $CREDS
  $VENV/bin/rf dataset DATA --out outputs/datasets/NAME --address $HEAD_IP:$PORT \\
      --tracking-uri $MLFLOW_URI --gpus-per-object 0.25
Stop with: $VENV/bin/ray stop (on each node)
MSG

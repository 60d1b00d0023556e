"""The deploy scripts expose nothing by default: MLflow on loopback, auth when exposed."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_start_head_serves_mlflow_on_loopback_unless_told_and_then_with_auth():
    script = (ROOT / "deploy" / "start-head.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "deploy" / "start-head.sh")], check=True)
    assert "MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}" in script
    assert '--host "$MLFLOW_HOST"' in script and "0.0.0.0 --port" not in script
    assert "--app-name basic-auth" in script and "MLFLOW_AUTH_CONFIG_PATH" in script
    assert "umask 077" in script and "chmod 700 outputs/mlflow" in script


def test_cluster_file_keeps_mlflow_private_and_storage_closed():
    text = (ROOT / "deploy" / "cluster-aws.yaml").read_text()
    assert "--host 127.0.0.1" in text and "--host 0.0.0.0" not in text
    assert not re.search(r"chmod\s+(-R\s+)?[0-7]?7[0-7]7\b", text)  # nothing world-writable
    assert "chmod 750 /mnt/shared" in text


def test_make_mlflow_server_defaults_to_loopback():
    assert "MLFLOW_HOST ?= 127.0.0.1" in (ROOT / "Makefile").read_text()

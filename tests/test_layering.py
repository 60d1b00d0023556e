import subprocess
import sys


def test_rf_core_imports_neither_ray_nor_mlflow():
    code = ("import sys, rf_core, rf_core.gt_render, rf_core.example_objects; "
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

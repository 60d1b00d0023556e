"""Benchmarks behind ``rf bench ...``: each prints a table and can write JSON.

Beside rf_core and rf_distributed, which it uses (rf_core never imports it). Modules are
imported where used (``import rf_bench`` alone pulls in nothing heavy). By module:

- ``multiview``: ``rf bench multiview``, the field fitted to GT renders of a mesh
- ``singleview``: ``rf bench singleview``, one GT view reconstructed, the others evaluated
- ``hashgrid``: ``rf bench hashgrid``, points/s of every hash-grid backend
- ``prior``: ``rf bench prior``, SDS and textual-inversion step times
- ``sharing`` (with ``sharing_models``, ``sharing_schemes``): ``rf bench prior-sharing``
- ``dataset``: ``rf bench dataset``, one node vs a cluster that loses a node
- ``gpu_check`` (with ``gpu_kernels``, ``gpu_pipeline``): ``rf bench gpu-check``
- ``mlflow_ui``: ``make ui-screenshots``, the MLflow UI of a sweep in headless Chromium
  (runs table, sweep and best-trial pages, artifacts, compare), PNGs and the visible text
- ``common``: timing, device names, atomic JSON
"""

__all__ = ["common", "dataset_cluster", "gpu_check", "gpu_kernels", "gpu_pipeline", "hashgrid",
           "mlflow_ui", "multiview", "prior", "sharing", "sharing_models", "sharing_schemes",
           "singleview"]

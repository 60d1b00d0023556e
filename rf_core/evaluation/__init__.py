"""Measuring a reconstruction against ground truth: alignment and per-view metrics
(``evaluate``), the cheap held-out reports a sweep ranks on (``heldout``) with their pictures
(``preview``), and every metric's name, direction and column (``metric_registry``).

Modules are imported where used.
"""

__all__ = ["evaluate", "heldout", "metric_registry", "preview"]

"""``rf compare``: finished reconstructions side by side, from MLflow, as a table, plots and a run.

Sweeps (``rf sweep``) and dataset runs (``rf dataset``) log one child run per trial or object.
This package selects such runs across experiments (``select``: :func:`select_runs`), tabulates
the settings that differ and the final metrics (``table``: :func:`comparison_table`, with
terminal, CSV and Markdown forms), draws PNG plots (``plots``: :func:`plot_comparison`), and
logs those files on an ``rf.kind=comparison`` run so the comparison itself is tracked
(``run``: :func:`run_compare`, :func:`format_compare`).
"""

from rf_distributed.compare.plots import PLOT_FILES, plot_comparison
from rf_distributed.compare.run import format_compare, run_compare
from rf_distributed.compare.select import CompareError, CompareSelection, select_runs
from rf_distributed.compare.table import (
    ID_COLUMNS,
    PREFERRED_METRICS,
    comparison_table,
    format_table,
    varying_params,
    write_csv,
    write_markdown,
)

__all__ = [
    "ID_COLUMNS",
    "PLOT_FILES",
    "PREFERRED_METRICS",
    "CompareError",
    "CompareSelection",
    "comparison_table",
    "format_compare",
    "format_table",
    "plot_comparison",
    "run_compare",
    "select_runs",
    "varying_params",
    "write_csv",
    "write_markdown",
]

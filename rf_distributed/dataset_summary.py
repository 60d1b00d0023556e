"""What ``rf dataset`` prints at the end: one row per object with its summary metrics, the
counts, and each failed or skipped entry's reason."""

from __future__ import annotations

import unicodedata

from rf_core.evaluation.metric_registry import summary_metrics

SUMMARY_METRICS = summary_metrics()


def format_dataset_summary(summary: dict) -> str:
    skipped = summary.get("skipped", 0)
    counts = (f"{summary['finished']} of {summary['objects']} entries finished, "
              f"{summary['failed']} failed, {skipped} skipped" if skipped else
              f"{summary['finished']} of {summary['objects']} objects finished, "
              f"{summary['failed']} failed")
    lines = [_summary_table(summary["rows"]), "", f"{counts}; results in {summary['folder']}"]
    for row in summary["rows"]:
        if row["status"] in ("failed", "skipped"):
            lines.append(f"  {row['status']} {row['object']}: {row['error']}")
    lines.append(f"MLflow (experiment {summary['experiment']}): {summary['mlflow']}")
    return "\n".join(lines)


def _summary_table(rows: list[dict]) -> str:
    cols = ["object", "status", *[m for m in SUMMARY_METRICS if any(m in r for r in rows)]]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(_width(c), *(_width(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(_pad(c, w) for c, w in zip(cols, widths))]
    lines += ["  ".join(_pad(v, w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: CJK letters (写真) take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


__all__ = ["SUMMARY_METRICS", "format_dataset_summary"]

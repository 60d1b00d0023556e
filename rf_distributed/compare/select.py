"""Which MLflow runs ``rf compare`` puts side by side: :class:`CompareSelection` and the queries.

Tags read here (written by ``tracking.sweep_callback.MLflowSweepCallback`` and
``tracking.dataset_tracker.DatasetTracker``):

- trial runs: ``rf.kind=trial``, ``mlflow.parentRunId``, ``rf.sweep_id``, ``rf.trial_id``,
  ``rf.status`` (finished, stopped by the scheduler, error, unfinished, running);
- object runs: ``rf.kind=object``, ``mlflow.parentRunId``, ``rf.dataset``, ``rf.object``,
  ``rf.status`` (finished, failed), ``rf.preset``, ``rf.model``;
- parents: ``rf.kind=sweep`` or ``dataset``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from rf_core.errors import UserError
from rf_distributed.tracking import tags as rf_tags

__all__ = ["PAGE_SIZE", "CompareError", "CompareSelection", "select_runs",
           "select_with_left_out"]

PAGE_SIZE = 1000
"""Runs (and experiments) per search request: MLflow's default page size."""

class CompareError(UserError, ValueError):
    """The comparison cannot be made; the message says what was wrong and what to do."""


@dataclass
class CompareSelection:
    """Which MLflow runs to put side by side; every given criterion narrows the set."""

    experiments: list[str] = field(default_factory=list)
    """Experiment names to search; empty: every active experiment."""
    tags: dict[str, str] = field(default_factory=dict)
    """Exact tag matches, e.g. ``{"rf.preset": "fast"}``."""
    run_ids: list[str] = field(default_factory=list)
    """Exactly these runs: full ids or unique prefixes (the table's short ids)."""
    filter: str | None = None
    """Extra MLflow search filter joined with ``and``, e.g. ``"metrics.input_psnr > 20"``."""
    kinds: list[str] = field(default_factory=lambda: ["trial", "object"])
    """``rf.kind`` values to include (empty: any); ignored when ``run_ids`` are given."""
    statuses: list[str] = field(default_factory=lambda: ["finished", "stopped"])
    """``rf.status`` values to include; empty: any (failed and unfinished runs too)."""

    def __post_init__(self):
        for name in ("experiments", "run_ids", "kinds", "statuses"):
            value = getattr(self, name)
            setattr(self, name, [value] if isinstance(value, str) else list(value))
        self.tags = {str(k): str(v) for k, v in dict(self.tags).items()}
        for key, value in self.tags.items():
            if "`" in key or ("'" in value and '"' in value):
                raise CompareError(f"tag {key}={value}: a tag name may not contain ` and a "
                                   "value not both kinds of quote; use filter= instead")

    def describe(self) -> str:
        """One line: what this selection searches."""
        parts = [f"experiments {', '.join(map(repr, self.experiments)) or 'all'}"]
        if self.run_ids:
            parts.append(f"run ids {', '.join(self.run_ids)}")
        else:
            parts.append(f"rf.kind in {self.kinds or 'any'}")
        parts.append(f"rf.status in {self.statuses}" if self.statuses else "any rf.status")
        parts += [f"tag {k}={v}" for k, v in self.tags.items()]
        if self.filter:
            parts.append(f"filter {self.filter!r}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- selection


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _tag_eq(key: str, value: str) -> str:
    return f"tags.`{key}` = {_quote(value)}"


def _search(client: mlflow.MlflowClient, experiment_ids: list[str], parts: Sequence[str],
            user_filter: str | None = None) -> list[Run]:
    """Every run matching all ``parts`` (and ``user_filter``), oldest first, page by page."""
    text = " and ".join([*parts, *([user_filter] if user_filter else [])])
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, text, max_results=PAGE_SIZE,
                                      order_by=["attributes.start_time ASC"], page_token=token)
        except MlflowException as e:
            if user_filter and e.error_code == "INVALID_PARAMETER_VALUE":
                reason = str(e.message).splitlines()[0]
                raise CompareError(
                    f"MLflow cannot search with filter {user_filter!r} ({reason}); use MLflow "
                    "search syntax, e.g. \"metrics.input_psnr > 20 and params.`recon.steps` = "
                    "'500'\"") from None
            raise
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiments(client: mlflow.MlflowClient, names: list[str]) -> dict[str, str]:
    """``{experiment_id: name}`` of ``names`` (all active experiments when empty)."""
    active, token = {}, None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE,
                                         page_token=token)
        active.update({e.name: e.experiment_id for e in page})
        token = page.token
        if not token:
            break
    if not active:
        raise CompareError(f"the MLflow store {client.tracking_uri} has no experiments; run "
                           "`rf sweep` or `rf dataset` first, or point the tracking URI at "
                           "the store that has them")
    unknown = [n for n in dict.fromkeys(names) if n not in active]
    if unknown:
        available = sorted(active)
        shown = ", ".join(available[:20]) + (f" (+{len(available) - 20} more)"
                                              if len(available) > 20 else "")
        raise CompareError(f"no MLflow experiment named {', '.join(map(repr, unknown))} at "
                           f"{client.tracking_uri}; available: {shown}")
    chosen = list(dict.fromkeys(names)) or sorted(active)
    return {active[n]: n for n in chosen}


def _status_ok(run: Run, statuses: list[str]) -> bool:
    return not statuses or run.data.tags.get(rf_tags.STATUS, "") in statuses


def select_with_left_out(client: mlflow.MlflowClient, selection: CompareSelection
            ) -> tuple[list[Run], list[Run]]:
    """(the runs ``selection`` names, oldest first; the runs that match all of it but its
    ``statuses``, which ``run_compare`` reports as left out)."""
    experiments = _experiments(client, selection.experiments)
    ids = list(experiments)
    parts = [_tag_eq(k, v) for k, v in selection.tags.items()]
    if selection.run_ids:
        return _select_ids(client, selection, experiments, parts), []
    if len(selection.kinds) == 1:  # MLflow has no IN for tags: one kind on the server
        parts.append(_tag_eq(rf_tags.KIND, selection.kinds[0]))
    runs = [r for r in _search(client, ids, parts, selection.filter)
            if not selection.kinds or r.data.tags.get(rf_tags.KIND, "") in selection.kinds]
    chosen = [r for r in runs if _status_ok(r, selection.statuses)]
    if not chosen:
        raise CompareError(_no_match(client, selection, experiments, parts))
    return chosen, [r for r in runs if not _status_ok(r, selection.statuses)]


def _select_ids(client: mlflow.MlflowClient, selection: CompareSelection,
                experiments: dict[str, str], parts: list[str]) -> list[Run]:
    where = (f"experiments {', '.join(map(repr, experiments.values()))}"
             if selection.experiments else "any active experiment")
    found: dict[str, Run] = {}
    missing = []
    for wanted in dict.fromkeys(i.strip().lower() for i in selection.run_ids):
        if not re.fullmatch(r"[0-9a-f]{1,32}", wanted):
            raise CompareError(f"{wanted!r} is not an MLflow run id (up to 32 hex digits)")
        op = f"= '{wanted}'" if len(wanted) == 32 else f"LIKE '{wanted}%'"
        hits = _search(client, list(experiments), [f"attributes.run_id {op}"])
        if len(hits) > 1:
            raise CompareError(f"run id prefix {wanted!r} matches {len(hits)} runs "
                               f"({', '.join(r.info.run_id[:12] for r in hits[:5])}, ...); "
                               "give more digits")
        if not hits:
            missing.append(wanted)
        for run in hits:
            found[run.info.run_id] = run
    if missing:
        raise CompareError(f"run ids not found in {where} at {client.tracking_uri}: "
                           f"{', '.join(missing)}; copy ids from the MLflow UI or a comparison "
                           "table, and check the experiments and tracking URI")
    kept = {r.info.run_id for r in found.values()}
    if parts or selection.filter:
        quoted = ", ".join(f"'{i}'" for i in found)
        matched = _search(client, list(experiments), [*parts, f"attributes.run_id IN ({quoted})"],
                          selection.filter)
        kept = {r.info.run_id for r in matched}
    dropped = []
    for run_id, run in found.items():
        status = run.data.tags.get(rf_tags.STATUS, "")
        if run_id not in kept:
            dropped.append(f"{run_id[:8]} (excluded by the tags/filter)")
        elif not _status_ok(run, selection.statuses):
            dropped.append(f"{run_id[:8]} (rf.status={status or 'unset'}, not in "
                           f"{selection.statuses}; an empty status list takes any)")
    if dropped:
        raise CompareError(f"runs asked for by id do not match the selection: "
                           f"{'; '.join(dropped)}; loosen the selection or leave those ids out")
    return list(found.values())


def _no_match(client: mlflow.MlflowClient, selection: CompareSelection,
              experiments: dict[str, str], parts: list[str]) -> str:
    """Why nothing matched, with what the searched experiments do hold."""
    base = f"no runs matched ({selection.describe()})"
    tag_parts = parts[: len(selection.tags)]
    present = _search(client, list(experiments), tag_parts, selection.filter)
    if not present:
        if selection.tags or selection.filter:
            return f"{base}: no run there has these tags/filter; loosen or drop them"
        return (f"{base}: these experiments hold no runs; run `rf sweep` or `rf dataset` "
                "first, or choose other experiments")
    counts = Counter((r.data.tags.get(rf_tags.KIND, "?"), r.data.tags.get(rf_tags.STATUS, "?"))
                     for r in present)
    held = ", ".join(f"{n} {kind}/{status}" for (kind, status), n in counts.most_common(6))
    return (f"{base}: the runs there are (rf.kind/rf.status) {held}; widen the selection "
            "(other kinds, an empty status list for any status, fewer tags)")


def select_runs(client: mlflow.MlflowClient, selection: CompareSelection) -> list[Run]:
    """The runs ``selection`` names, oldest first; raises :class:`CompareError` naming an
    unknown experiment (with those available) or, when nothing matches, what was searched
    and what the experiments hold instead."""
    return select_with_left_out(client, selection)[0]

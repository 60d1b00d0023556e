"""Ray + MLflow around rf_core: shared prior servers, Tune sweeps, dataset runs, comparison.

Uses only rf_core's public names. Modules are imported where used (``import rf_distributed``
alone pulls in neither Ray nor MLflow). Public names, by module:

- ``prior_server``: ``PriorServer``, ``PriorClient``, ``start_prior_server``, ``server_name``
- ``sweep``: ``run_sweep``, ``format_summary``, ``train_trial``, ``ClusterError``
- ``search_space``: ``load_sweep``, ``to_tune_space``, ``make_scheduler``, ``SweepSpec``
- ``tracking``: ``resolve_tracking_uri``, ``check_tracking_uri``, ``log_finished_run``,
  ``TrackingError``, ``DatasetTracker``; ``tracking.sweep_callback``: ``MLflowSweepCallback``
  (the one tracking module that imports Ray Tune)
- ``dataset``: ``run_dataset``, ``run_object``, ``format_dataset_summary``
- ``compare``: ``CompareSelection``, ``run_compare``, ``select_runs``, ``comparison_table``,
  ``format_compare``, ``format_table``, ``write_csv``, ``write_markdown``
"""

__all__ = ["compare", "dataset",
           "prior_server", "search_space", "sweep", "tracking"]

"""Ray + MLflow around rf_core: shared prior servers, Tune sweeps, dataset runs, comparison.

Uses only rf_core's public names. Modules are imported where used (``import rf_distributed``
alone pulls in neither Ray nor MLflow). Public names, by module:

- ``cluster``: ``connect``, ``check_reachable``, ``check_trial_fits``, ``ClusterError``
- ``prior_server``: ``PriorServer``, ``PriorClient``, ``start_prior_server``;
  ``server_placement``: ``server_name`` (per node, GPU and model), ``server_gpu``;
  ``inversion_turns``: ``InversionTurns`` (when an inversion may step between SDS batches)
- ``placement``: ``object_memory_estimate``, ``plan_objects_per_gpu``, ``probe_gpu_memory``,
  ``PlacementError`` (objects per GPU from memory)
- ``sweep``: ``run_sweep``, ``format_summary``, ``train_trial``, ``prepare_object``
- ``sweep_objects``: ``ObjectFit``, ``ObjectInputs``, ``aggregate``, ``objective``
- ``sweep_spec``: ``load_sweep``, ``SweepSpec``, ``make_scheduler``
- ``search_space``: ``validate_space``, ``to_tune_space``, ``trial_overrides``
- ``tracking``: ``resolve_tracking_uri``, ``check_tracking_uri``, ``log_finished_run``,
  ``TrackingError``, ``DatasetTracker``; ``tracking.sweep_callback``: ``MLflowSweepCallback``
  (the one tracking module that imports Ray Tune)
- ``dataset_run``: ``run_dataset``, ``DatasetOptions``; ``dataset_summary``:
  ``format_dataset_summary``; ``dataset_task``: ``run_object``, ``ObjectTask``, ``ProgressBoard``
- ``compare``: ``CompareSelection``, ``run_compare``, ``select_runs``, ``comparison_table``,
  ``format_compare``, ``format_table``, ``write_csv``, ``write_markdown``
"""

__all__ = ["cluster", "compare", "dataset_run", "dataset_summary", "dataset_task",
           "inversion_turns", "placement", "prior_server", "search_space", "sweep",
           "sweep_objects", "sweep_spec", "tracking"]

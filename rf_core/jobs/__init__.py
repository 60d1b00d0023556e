"""The jobs that fill and read run folders: ``rf reconstruct`` (``reconstruct_job``, configured by
``job_config``), ``rf export`` (``export_job``), ``rf invert`` (``invert_job``), ``rf evaluate``
(``evaluate_run``), ``rf view`` (``viewer``), reading a run back (``run_loading``), and where a
run's learned token comes from (``embedding_source``).

Modules are imported where used.
"""

__all__ = ["embedding_source", "evaluate_run", "export_job", "invert_job", "job_config",
           "reconstruct_job", "run_loading", "viewer"]

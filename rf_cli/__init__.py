"""The `rf` command line (entry point ``rf_cli.main:main``). One module per command group:

- ``main``: parser assembly, the error boundary, ``main()``
- ``run_commands``: ``render-gt``, ``invert``, ``reconstruct``, ``export``, ``evaluate``
- ``distributed``: ``sweep``, ``dataset``, ``compare``
- ``bench``: ``bench ...`` (the benchmarks of rf_bench)
- ``args``: ``add_overrides``, the ``--config``/``KEY=VALUE`` arguments they share
"""

__all__ = ["args", "bench", "distributed", "main", "run_commands"]

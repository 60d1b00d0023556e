"""Fitting a field to one photo: the ``Reconstructor`` step, its losses, the fitting loop
(``engine.fit``) and its callbacks, and saved-state checks.

Modules are imported where used.
"""

__all__ = ["engine", "losses", "reconstruct", "reconstruct_state"]

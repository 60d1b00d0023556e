"""Files that never lose a user's work: atomic writes (``atomic``), output folders with markers,
locks and all-or-nothing replacement (``run_folder``), and self-describing, verified checkpoints
(``checkpoint``).

Modules are imported where used.
"""

__all__ = ["atomic", "checkpoint", "run_folder"]

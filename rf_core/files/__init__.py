"""Files that never lose a user's work: atomic writes (``atomic``), output folders with markers,
locks and all-or-nothing replacement (``run_folder``), and self-describing, verified checkpoints
(``checkpoint``); the named moments where a test may stop a command (``fault_points``).

Modules are imported where used.
"""

__all__ = ["atomic", "checkpoint", "fault_points", "run_folder"]

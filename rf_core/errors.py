"""The one error base the command line trusts to be the user's to fix.

Every exception a user can cause and fix (a bad config key, a missing file, a folder in use)
derives from :class:`UserError`, and its message is one line that names the problem and the fix.
``rf`` prints those as ``rf: error: ...``; anything else is a bug and is reported as one.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; ``str(err)`` is one line saying what and how."""


class OutputError(UserError):
    """An output path cannot be used: it is an input, not ours to replace, or not writable."""


class OutputExistsError(OutputError, FileExistsError):
    """The output already exists and no ``--overwrite`` was given."""


class InUseError(UserError):
    """Another process holds the lock of a run, sweep or dataset folder."""

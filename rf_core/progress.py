"""Progress bars for long work (tqdm), and the one way to silence them: ``quiet()``.

The caller chooses: work wrapped in ``with quiet():`` shows no progress bars and no loaders'
one-line notes. The block is per thread (a ``contextvars.ContextVar``: another thread, and
work in another process, are not silenced by it; nested blocks restore the outer state) and
changes no environment variable. Work that runs elsewhere (a Ray task or actor, a Tune
trainable) enters its own ``quiet()`` there.

``RF_QUIET=1`` in the environment is the user's switch: set before ``rf`` starts, it silences
every bar and note, in every process that inherits it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from tqdm.auto import tqdm

__all__ = ["in_quiet_block", "is_quiet", "progress", "quiet"]

QUIET_ENV = "RF_QUIET"
"""The user's switch: ``RF_QUIET=1`` in the environment silences everything (read, never
written, by the library)."""

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("rf_quiet", default=False)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence progress bars and loaders' notes inside the block (this thread and the asyncio
    tasks it starts only)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def in_quiet_block() -> bool:
    """Whether the caller asked for silence with :func:`quiet` (not the user's ``RF_QUIET``):
    for work that only feeds a bar, such as a live progress board."""
    return _QUIET.get()


def is_quiet() -> bool:
    """Whether progress output is silenced here: inside :func:`quiet`, or ``RF_QUIET=1``."""
    return _QUIET.get() or os.environ.get(QUIET_ENV) == "1"


def progress(total: int | None = None, desc: str = "", **kw) -> tqdm:
    """A tqdm bar on stderr; a :func:`quiet` block or ``RF_QUIET=1`` silences it."""
    return tqdm(total=total, desc=desc, disable=is_quiet(), dynamic_ncols=True, leave=False,
                **kw)

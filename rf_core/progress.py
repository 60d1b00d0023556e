"""Progress bars for long work (tqdm), quiet when asked or when RF_QUIET=1."""

from __future__ import annotations

import contextlib
import os

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", disable: bool = False, **kw) -> tqdm:
    """A tqdm bar on stderr; ``disable`` or ``RF_QUIET=1`` silences it."""
    disable = disable or os.environ.get("RF_QUIET") == "1"
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False, **kw)


@contextlib.contextmanager
def progress_context(show: bool):
    """Silence rf_core progress bars (``RF_QUIET``) inside the block unless ``show``."""
    old = os.environ.get("RF_QUIET")
    if not show:
        os.environ["RF_QUIET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RF_QUIET", None)
        else:
            os.environ["RF_QUIET"] = old

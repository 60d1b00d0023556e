"""Progress bars for long work (tqdm), quiet when asked or when RF_QUIET=1."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", disable: bool = False, **kw) -> tqdm:
    """A tqdm bar on stderr; ``disable`` or ``RF_QUIET=1`` silences it."""
    disable = disable or os.environ.get("RF_QUIET") == "1"
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False, **kw)

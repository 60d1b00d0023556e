"""Turns between SDS batches and an inversion on one prior server: an inversion step starts only
after a grace window with no SDS request (or after ``yield_batches`` batches under unbroken
load), so that trials' SDS is never stuck behind a whole inversion step it could have beaten."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

GRACE_CAP_S = 0.25
"""The adaptive grace window's upper bound: trials quieter than this leave the model to an
inversion (it then waits at most this long after a batch)."""
GRACE_GAP_FACTOR = 2.0
"""The adaptive grace window is this multiple of the 90th percentile of recent gaps."""
GAPS_KEPT = 64
"""Recent gaps (batch end to next request) the adaptive grace window is measured over."""


class InversionTurns:
    """When an inversion may take its next step on a server shared with SDS batches.

    Bookkeeping only: the server calls it holding its ``_turn`` condition, reports each SDS
    request's arrival and each batch's end, and asks ``inversion_turn`` before every inversion
    step. ``clock``: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, max_wait_s: float, yield_batches: int, grace_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if yield_batches < 1:
            raise ValueError(f"invert_yield_batches must be >= 1, got {yield_batches}")
        if grace_s is not None and grace_s < 0:
            raise ValueError(f"invert_grace_ms must be >= 0, got {grace_s * 1000:g}")
        self.max_wait, self.yield_batches, self.fixed_grace = max_wait_s, yield_batches, grace_s
        self.clock = clock
        self.waiting = 0  # requests received and not yet computed
        self.batches = 0  # batches computed (or failed)
        self.last_end: float | None = None  # when the last batch ended
        self.gaps: deque[float] = deque(maxlen=GAPS_KEPT)  # batch end -> next request, s

    def arrived(self) -> None:
        """An SDS request reached the server."""
        if self.waiting == 0 and self.last_end is not None:
            self.gaps.append(self.clock() - self.last_end)
        self.waiting += 1

    def batch_done(self, requests: int) -> None:
        self.waiting -= requests
        self.batches += 1
        self.last_end = self.clock()

    def grace(self) -> float:
        """Seconds after a batch during which the inversion expects more SDS requests."""
        if self.fixed_grace is not None:
            return self.fixed_grace
        if not self.gaps:
            return self.max_wait
        gaps = sorted(self.gaps)
        typical = gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))]
        return min(GRACE_CAP_S, max(self.max_wait, GRACE_GAP_FACTOR * typical))

    def inversion_turn(self, since_batches: int) -> tuple[str | None, float | None]:
        """("forced" or "idle", None) if the inversion may step now, else (None, the longest
        it should wait before asking again; None: until a batch ends). ``since_batches``: the
        batch count when the inversion last gave the model up."""
        if self.batches >= since_batches + self.yield_batches:
            return "forced", None  # unbroken SDS load: the inversion's guaranteed step
        if self.waiting:
            return None, None
        if self.last_end is None:
            return "idle", None
        left = self.last_end + self.grace() - self.clock()
        return ("idle", None) if left <= 0 else (None, left)

"""How much of its work a training step takes without asking the device: shares carried over
from the previous step's counts.

Two choices in a render depend on values only the device knows: which samples are heavy
enough to deserve a normal, and which samples of the later march segments lie on rays that
are still transparent. Finding either exactly needs ``nonzero`` (a host sync). Instead each
step takes a *share* (the heaviest samples for normals, the most transparent rays' samples
for the march) sized from what the previous step measured, and reads this step's counts with
its metrics, in the one transfer it makes anyway. The first step, with nothing measured yet,
finds both exactly.
"""

from __future__ import annotations

import torch

from rf_core.scene.render import RenderOutput

NORMALS_SHARE_MARGIN = 1.0
"""The normals' share over the last step's measured one (a short share drops faint normals)."""
MARCH_SHARE_MARGIN = 1.05
"""A later march segment's share over the last step's measured one."""
MARCH_SHARE_DECAY = 0.98
"""The share follows a rise at once but falls by at most this factor per step: the random
views change from step to step (on the oracle's duck the measured share moved between 0.49
and 0.86 from one step to the next), and a short share drops samples of rays still alive.
Following the last step alone (decay 0) dropped up to 3,800 samples a step there."""


class SampleShares:
    """The shares a :class:`~rf_core.fitting.reconstruct.Reconstructor` carries from step to step.

    ``normals``: share of a view's evaluated samples that get normals (None before the first
    step). ``march[role]``: per later march segment, the share of its active samples to
    evaluate, for each kind of render (``"input"``: the input view's rays, ``"views"``: the
    random views).
    """

    ROLES = ("input", "views")

    def __init__(self) -> None:
        self.normals: float | None = None
        self.march: dict[str, list[float] | None] = dict.fromkeys(self.ROLES)
        self._watched: list[tuple[str, RenderOutput]] = []

    def watch(self, role: str, out: RenderOutput) -> None:
        """Remember ``out``'s device counts, to read with the step's metrics."""
        self._watched.append((role, out))

    def device_values(self) -> list[torch.Tensor]:
        """The watched renders' counts, as device scalars, in the order :meth:`update` reads."""
        values = []
        for _, out in self._watched:
            if out.normals_wanted is not None:
                values.append(out.normals_wanted)
            if out.segments_wanted is not None:
                values.extend(out.segments_wanted[1:].unbind())
                values.append(out.dropped)
        return values

    def update(self, values: list[float]) -> dict[str, float]:
        """Set the next step's shares from ``values`` (:meth:`device_values`, read); returns
        the step's metrics: ``normals/share``, ``march/share`` (the largest later segment's,
        random views) and ``march/dropped`` (samples of alive rays the shares left out)."""
        normals, march = [], {role: [] for role in self.ROLES}
        dropped, it = 0.0, iter(values)
        for role, out in self._watched:
            if out.normals_wanted is not None:
                normals.append(next(it) / max(out.samples, 1))
            if out.segments_wanted is not None:
                counts = out.segment_counts[1:]
                march[role].append([next(it) / max(c, 1) for c in counts])
                dropped += next(it)
        self._watched = []
        metrics: dict[str, float] = {"march/dropped": dropped}
        if normals:
            share = max(normals)
            metrics["normals/share"] = share
            self.normals = min(1.0, NORMALS_SHARE_MARGIN * share + 1e-3)
        for role, rows in march.items():
            if rows and rows[0]:
                measured = [max(col) for col in zip(*rows)]
                old = self.march[role] or [0.0] * len(measured)
                self.march[role] = [min(1.0, max(MARCH_SHARE_MARGIN * s + 1e-3,
                                                 MARCH_SHARE_DECAY * o))
                                    for s, o in zip(measured, old)]
                if role == "views":
                    metrics["march/share"] = max(measured)
        return metrics

    def state(self) -> dict[str, torch.Tensor]:
        """The shares as tensors for a checkpoint (-1: none yet)."""
        rows = [self.march[r] or [] for r in self.ROLES]
        width = max(len(r) for r in rows)
        march = torch.full((len(rows), width), -1.0, dtype=torch.float64)
        for i, row in enumerate(rows):
            march[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
        return {"normals_share": torch.tensor(-1.0 if self.normals is None else self.normals,
                                              dtype=torch.float64),
                "march_shares": march}

    def load(self, state: dict) -> None:
        """Shares from :meth:`state`'s tensors in a checkpoint (older ones have none)."""
        share = float(state.get("normals_share", -1.0))
        self.normals = None if share < 0 else share
        march = state.get("march_shares")
        for i, role in enumerate(self.ROLES):
            row = [] if march is None or march.shape[0] <= i else \
                [float(v) for v in march[i] if v >= 0]
            self.march[role] = row or None

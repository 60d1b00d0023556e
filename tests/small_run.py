"""The small run the end-to-end tests share: the tiny preset cut to a few steps, 24 px input
renders of 256 rays, 16 px SDS views, 24 samples per ray, a 4-level hash grid and a coarse
video and mesh. A test adds what it checks (steps, checkpoints, logging) after these; a later
override of the same key wins.

At these sizes a step takes milliseconds, so a test's time goes to what it checks (resume,
tracking, orchestration), not to rendering: one object of
``rf_bench.dataset_cluster.QUICK_OVERRIDES`` (24 steps) takes about 25 s at the tiny preset's own
sizes and under 3 s with ``RENDER``.
"""

from __future__ import annotations

RENDER = ["recon.input_size=24", "recon.input_rays=256", "recon.sds_size=16",
          "recon.renderer.num_samples=24", "recon.renderer.occupancy.resolution=16",
          "recon.renderer.occupancy.warmup_steps=2", "recon.renderer.occupancy.update_every=2",
          "recon.field.grid.n_levels=4", "recon.field.grid.log2_hashmap_size=12",
          "recon.levels=[0,2,4,4]"]
"""Render and field sizes of a small run (``recon.levels`` fits the 4-level grid)."""

EXPORT = ["export.video.frames=2", "export.video.size=16", "export.mesh_resolution=24",
          "export.threshold=1.0"]
"""A two-frame 16 px video and a 24^3 mesh."""

SMALL = ["recon.steps=6", "recon.albedo_steps=2", "inversion.steps=2", "input.size=64",
         *RENDER, *EXPORT, "checkpoint_every=3", "device=cpu"]
"""A whole `rf reconstruct` job: 6 steps (checkpoints at 3 and 6), 2 inversion steps."""

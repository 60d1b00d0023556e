"""The 3D scene: cameras, the radiance field (hash-grid ``encoding`` plus small MLPs), volume
rendering, ray marching and the random views of a training step.

Modules are imported where used.
"""

__all__ = ["cameras", "encoding", "field", "random_views", "ray_march", "render", "sample_shares"]

"""Ground truth: views of a textured mesh rendered in our convention (``gt_render``), the example
objects built from pybullet's meshes (``example_objects``), and the image and geometry metrics
that compare a reconstruction with them (``metrics``).

Modules are imported where used.
"""

__all__ = ["example_objects", "gt_render", "metrics"]

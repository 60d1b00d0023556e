"""What a fitted field turns into: orbit videos and marching-cubes meshes (``export``), and mesh
files and their previews (``mesh_io``).

Modules are imported where used.
"""

__all__ = ["export", "mesh_io"]

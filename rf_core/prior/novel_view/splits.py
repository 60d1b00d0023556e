"""Which meshes evaluate the reconstruction, and so must never train the novel-view prior.

This module is the one place that says so. A prior that had seen the duck from every side would
make every duck benchmark meaningless, so the training set (``rf_core.prior.novel_view.objects``)
draws its meshes only through ``is_evaluation_mesh``:

- ``EVALUATION_MESHES``: every ``pybullet_data:`` mesh a benchmark, test, example, Makefile
  target or default sweep evaluates on. The example objects (``example_objects.MESHES``, which
  ``rf dataset``, ``make dataset``, ``tune_configs`` (``objects: pybullet:N``) and the
  benchmarks use) plus ``EXTRA_EVALUATION_MESHES``.
  ``tests/rf_core/test_novel_view_data.py`` scans the repository for mesh names and fails when
  one is missing here: add a new benchmark mesh to ``EXTRA_EVALUATION_MESHES``.
- Whole families are excluded, not only the files: everything in the folder of a mesh that lives
  in a folder (``torus/``, ``jenga/``), and at the top level every file whose stem, stripped of
  a decoration such as ``_vhacd`` or ``textured_``, is the same (``duck_vhacd.obj`` is the
  duck's collision hull, ``sphere_smooth.obj`` the textured sphere's geometry).
"""

from __future__ import annotations

from pathlib import PurePosixPath

from rf_core.ground_truth.example_objects import MESHES
from rf_core.ground_truth.gt_render import PYBULLET_PREFIX

__all__ = ["EVALUATION_MESHES", "EXTRA_EVALUATION_MESHES", "is_evaluation_mesh", "mesh_family",
           "pybullet_name"]

EXTRA_EVALUATION_MESHES: tuple[str, ...] = (
    # Not evaluated themselves, but the same geometry as an evaluated mesh; listed so that the
    # exclusion is explicit (the family rule below would catch them too).
    "pybullet_data:duck_vhacd.obj",
    "pybullet_data:sphere_smooth.obj",
)
"""Evaluation meshes that are not example objects."""

EVALUATION_MESHES: tuple[str, ...] = tuple(dict.fromkeys(
    [mesh for _name, mesh, _up, _view in MESHES] + list(EXTRA_EVALUATION_MESHES)))
"""Every mesh the reconstruction is evaluated on, as ``pybullet_data:RELATIVE/PATH.obj``."""

_STEM_DECORATIONS = ("textured_", "_textured", "_vhacd", "_col", "_smooth", "_lores")


def pybullet_name(path: str) -> str:
    """``pybullet_data:duck.obj``, ``duck.obj`` or ``./duck.obj`` -> ``duck.obj`` (a path
    relative to ``pybullet_data``, POSIX separators)."""
    text = str(path)
    if text.startswith(PYBULLET_PREFIX):
        text = text[len(PYBULLET_PREFIX):]
    return PurePosixPath(text.replace("\\", "/")).as_posix()


def mesh_family(path: str) -> str:
    """The family a pybullet_data mesh belongs to: ``"torus/"`` (its folder) for a mesh in a
    folder, else its stem without decorations (``duck_vhacd.obj`` -> ``"duck"``,
    ``textured_sphere_smooth.obj`` -> ``"sphere"``)."""
    rel = PurePosixPath(pybullet_name(path))
    if len(rel.parts) > 1:
        return rel.parts[0] + "/"
    stem = rel.stem.lower()
    changed = True
    while changed:
        changed = False
        for deco in _STEM_DECORATIONS:
            if deco.startswith("_") and stem.endswith(deco) and len(stem) > len(deco):
                stem, changed = stem[:-len(deco)], True
            elif deco.endswith("_") and stem.startswith(deco) and len(stem) > len(deco):
                stem, changed = stem[len(deco):], True
    return stem


_EVALUATION_FAMILIES = frozenset(mesh_family(m) for m in EVALUATION_MESHES)


def is_evaluation_mesh(path: str) -> bool:
    """True when ``path`` (``pybullet_data:NAME.obj`` or a path relative to pybullet_data) is an
    evaluation mesh or of an evaluation mesh's family: it must not be trained on."""
    return mesh_family(path) in _EVALUATION_FAMILIES

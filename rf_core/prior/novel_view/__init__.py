"""A learned novel-view prior (Zero-1-to-3 style): given the input view of an object and a
relative camera, predict the object's view from that camera.

``splits`` says which meshes evaluate the reconstruction and are never trained on; ``objects``
draws and renders training objects; ``data`` builds the training set and serves its pairs;
``geometry`` turns cameras into the model's camera features; ``model`` is the network
(regressor or diffusion), ``train`` its resumable trainer and ``card`` its model card.
Rendering needs pybullet and trimesh, imported only when ``build_dataset`` runs: reading a
built dataset needs neither.
"""

from rf_core.prior.novel_view.data import NovelViewDataConfig, NovelViewPairs, build_dataset
from rf_core.prior.novel_view.geometry import CAMERA_FEATURES, angles_from_cameras, camera_features
from rf_core.prior.novel_view.model import NovelViewConfig, NovelViewModel
from rf_core.prior.novel_view.splits import EVALUATION_MESHES, is_evaluation_mesh

__all__ = ["CAMERA_FEATURES", "EVALUATION_MESHES", "NovelViewConfig", "NovelViewDataConfig",
           "NovelViewModel", "NovelViewPairs", "angles_from_cameras", "build_dataset",
           "camera_features", "is_evaluation_mesh"]

"""rf_core: RealFusion's method, usable alone. Never imports ray or mlflow.

The subpackages follow the path the data takes: ``files`` (writes that never lose work),
``input`` (the photo), ``scene`` (cameras, hash grid, field, rendering), ``ground_truth``,
``prior`` (diffusion and learned priors), ``fitting`` (the Reconstructor and its loop),
``output`` (video, mesh), ``evaluation`` and ``jobs`` (the commands that fill run folders).
Public names are listed here; the diffusion prior is ``rf_core.prior`` (diffusers is imported
only when a model is built or loaded); ground-truth rendering (pybullet) is imported from
``rf_core.ground_truth``. The benchmarks are the separate package ``rf_bench``.
"""

from rf_core.config import ConfigError, Schedule, load_config, save_config
from rf_core.evaluation.metric_registry import METRICS, MetricSpec
from rf_core.fitting.engine import Callback, FitResult, fit
from rf_core.ground_truth.metrics import depth_error, mask_iou, psnr, ssim
from rf_core.input.image_input import InputConfig, InputError, ProcessedInput, load_input
from rf_core.scene.cameras import (
    Cameras,
    OrbitConfig,
    generate_rays,
    intrinsics_from_fov,
    look_at,
    orbit_cameras,
    project,
    sample_orbit,
    sphere_views,
)
from rf_core.scene.encoding import HashGridConfig, HashGridEncoding, available_backends
from rf_core.scene.field import Background, BackgroundConfig, FieldConfig, RadianceField
from rf_core.scene.render import (
    OccupancyConfig,
    OccupancyGrid,
    RendererConfig,
    VolumeRenderer,
    render_image,
)

__all__ = [
    "Background", "BackgroundConfig", "Callback", "Cameras", "ConfigError", "FieldConfig",
    "FitResult", "HashGridConfig", "HashGridEncoding", "InputConfig", "InputError", "METRICS",
    "MetricSpec", "OccupancyConfig", "OccupancyGrid", "OrbitConfig", "ProcessedInput",
    "RadianceField", "RendererConfig", "Schedule", "VolumeRenderer", "available_backends",
    "depth_error", "fit", "generate_rays", "intrinsics_from_fov", "load_config", "load_input",
    "look_at", "mask_iou", "orbit_cameras", "project", "psnr", "render_image", "sample_orbit",
    "save_config", "sphere_views", "ssim",
]

"""rf_core: RealFusion's method, usable alone. Never imports ray or mlflow.

Public names are listed here; the diffusion prior is ``rf_core.prior`` (diffusers is imported
only when a model is built or loaded); ground-truth rendering (``rf_core.gt_render``,
pybullet) and its example objects (``rf_core.example_objects``) are imported from their
modules. The benchmarks are the separate package ``rf_bench``.
"""

from rf_core.cameras import (
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
from rf_core.config import ConfigError, Schedule, load_config, save_config
from rf_core.encoding import HashGridConfig, HashGridEncoding, available_backends
from rf_core.engine import Callback, FitResult, fit
from rf_core.field import Background, BackgroundConfig, FieldConfig, RadianceField
from rf_core.image_input import InputConfig, InputError, ProcessedInput, load_input
from rf_core.metric_registry import METRICS, MetricSpec
from rf_core.metrics import depth_error, mask_iou, psnr, ssim
from rf_core.render import (
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

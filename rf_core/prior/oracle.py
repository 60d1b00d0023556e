"""``OraclePrior``: a ground-truth "prior" that proves the SDS path end to end, offline.

It answers ``sds_grad`` like ``StableDiffusionPrior`` does, but instead of asking a diffusion
model it renders the true mesh (pybullet TinyRenderer, exactly as
``rf_core.ground_truth.gt_render``) at the random view's own camera, composites it over the same
solid background the view was rendered over, and returns the image-space residual::

    grad = scale * (images - gt)            # [B,3,H,W] float32

Applied with ``sds_loss`` (``0.5 * sum(residual^2)``, gradient exactly ``grad``), it is an L2
photometric loss on every random view: a reconstruction under this prior is a multi-view fit
whose views are the reconstructor's random cameras. So whatever a real prior should achieve on
unseen sides, the oracle shows what the machinery (cameras, backgrounds, shading, schedules,
the loss plumbing) can reach when the prior is perfect.

The mesh is normalised exactly as ``rf render-gt`` does (``gt_render.normalize_transform``:
bounding-box centre to the origin, farthest vertex at ``radius``, ``up_axis`` turned to +z), so
its views line up with a GT folder rendered with the same ``radius``/``up_axis``.
``world_transform`` (optional [4,4], the reconstruction's world -> the GT world, as
``rf_core.evaluation.evaluate.align_from_input_view`` returns) maps each camera before rendering;
it is the identity when the input camera is GT view 0's (``rf bench singleview``).

One pybullet DIRECT connection per prior, opened on first use with the mesh loaded once; every
call then only renders. Views need cameras: the conditioning's ``c2w``, ``K`` and
``image_size``, filled by the Reconstructor for every random view.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from rf_core.ground_truth.gt_render import (
    TINY_PRINCIPAL_SHIFT,
    UP_QUATERNIONS,
    LightConfig,
    MeshError,
    load_textured_mesh,
    normalize_transform,
    opengl_projection_matrix,
    opengl_view_matrix,
    resolve_mesh_path,
    up_rotation,
)
from rf_core.prior.base import (
    NoInversionError,
    TextFreePrior,
    check_sds_inputs,
)
from rf_core.prior.conditioning import Conditioning

_NO_INVERSION = ("textual inversion does not apply to the oracle prior (it has no text model); "
                 "run without --invert")


class OraclePrior(TextFreePrior):
    """Ground-truth renders as the "score": ``sds_grad = scale * (images - gt)``.

    mesh_path: a textured OBJ or ``pybullet_data:NAME.obj`` (an untextured mesh is a one-line
    ``MeshError`` here, before anything else happens). up_axis, radius: as ``rf render-gt``.
    scale: multiplies the residual. light, near, far: as ``gt_render.render_views``.
    """

    no_inversion = _NO_INVERSION

    def __init__(self, mesh_path: str | os.PathLike, up_axis: str = "y", radius: float = 0.8,
                 scale: float = 1.0, *, world_transform=None, light: LightConfig | None = None,
                 near: float = 0.1, far: float = 10.0):
        super().__init__()
        up_rotation(up_axis)  # a bad axis is a ValueError now, not at the first render
        if not scale > 0:
            raise ValueError(f"oracle scale must be positive, got {scale}")
        self.mesh_path = str(mesh_path)
        self.up_axis = up_axis
        self.radius = float(radius)
        self.scale = float(scale)
        self.light = light or LightConfig()
        self.near, self.far = float(near), float(far)
        mesh = load_textured_mesh(mesh_path)  # MeshError for missing / untextured meshes
        self.mesh_scale, self.offset = normalize_transform(mesh, self.radius, up_axis)
        T = np.eye(4) if world_transform is None else np.asarray(
            torch.as_tensor(world_transform, dtype=torch.float64).cpu(), dtype=np.float64)
        if T.shape != (4, 4):
            raise ValueError(f"world_transform must be [4, 4], got {list(T.shape)}")
        self.world_transform = T
        self.calls = 0
        """``sds_grad`` calls so far."""
        self.loads = 0
        """Times the mesh was loaded into pybullet (1 after the first call, per connection)."""
        self._client: int | None = None
        self._body: int | None = None

    # ------------------------------------------------------------------ interface
    @property
    def sd(self):
        # rf_core.prior.inversion.invert reads ``prior.sd`` first: the same one-line refusal.
        raise NoInversionError(_NO_INVERSION)

    def sds_grad(self, images: torch.Tensor, conditioning: Conditioning, cfg=None, *,
                 step: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``scale * (images - gt)``: [B,3,H,W] float32 on the images' device.

        images: [B,3,H,W] in [0,1]; conditioning: with ``c2w``/``K``/``image_size`` (and
        ``background``, white when absent). ``cfg``, ``step`` and ``generator`` are accepted for
        the interface and unused: the oracle is deterministic.
        """
        check_sds_inputs(images, conditioning)
        gt = self.render(conditioning, tuple(images.shape[-2:]))
        self.calls += 1
        return (self.scale * (images.detach().float() - gt.to(images.device))).float()

    # ------------------------------------------------------------------ rendering
    def render(self, conditioning: Conditioning, size: tuple[int, int] | None = None
               ) -> torch.Tensor:
        """The GT of each view composited over its background: [B,3,H,W] float32 in [0,1]."""
        rgb, mask = self.render_views(conditioning, size)
        if conditioning.background is not None:
            bg = conditioning.background.detach().float().cpu()
        else:
            bg = torch.ones(len(conditioning), 3)
        m = mask[:, None].float()
        return m * rgb + (1 - m) * bg[:, :, None, None]

    def render_views(self, conditioning: Conditioning, size: tuple[int, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw GT renders: rgb [B,3,H,W] float32 (on white) and mask [B,H,W] bool.

        ``size`` (H, W), when it differs from ``conditioning.image_size``, rescales ``K``.
        """
        if not conditioning.has_cameras:
            raise ValueError("the oracle prior needs each view's camera: the conditioning has no "
                             "c2w/K/image_size (make_conditioning(..., cameras=...))")
        import pybullet as p

        H0, W0 = conditioning.image_size
        H, W = (H0, W0) if size is None else (int(size[0]), int(size[1]))
        c2w = conditioning.c2w.detach().cpu().double().numpy()
        K = conditioning.K.detach().cpu().double().numpy().copy()
        if (H, W) != (H0, W0):
            K[:, 0] *= W / W0
            K[:, 1] *= H / H0
        K[:, 0, 2] += TINY_PRINCIPAL_SHIFT[0]
        K[:, 1, 2] += TINY_PRINCIPAL_SHIFT[1]
        client, body = self._connect()
        n = len(c2w)
        rgb = np.full((n, H, W, 3), 255, np.uint8)
        mask = np.zeros((n, H, W), bool)
        for b in range(n):
            _, _, img, _, seg = p.getCameraImage(
                W, H, opengl_view_matrix(self.world_transform @ c2w[b]),
                opengl_projection_matrix(K[b], W, H, self.near, self.far),
                renderer=p.ER_TINY_RENDERER, shadow=0,
                lightDirection=list(self.light.direction),
                lightAmbientCoeff=self.light.ambient, lightDiffuseCoeff=self.light.diffuse,
                lightSpecularCoeff=0.0, physicsClientId=client)
            m = np.reshape(seg, (H, W)) == body
            mask[b] = m
            rgb[b][m] = np.reshape(img, (H, W, 4))[..., :3][m]
        rgb_t = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
        return rgb_t, torch.from_numpy(mask)

    def _connect(self) -> tuple[int, int]:
        """The pybullet connection with the mesh loaded, made once (as gt_render.render_views)."""
        import pybullet as p

        if self._client is not None and p.isConnected(physicsClientId=self._client):
            return self._client, self._body
        client = p.connect(p.DIRECT)
        try:
            p.setPhysicsEngineParameter(enableFileCaching=0, physicsClientId=client)
            try:
                shape = p.createVisualShape(p.GEOM_MESH,
                                            fileName=str(resolve_mesh_path(self.mesh_path)),
                                            meshScale=[self.mesh_scale] * 3,
                                            physicsClientId=client)
            except p.error as exc:
                raise MeshError(f"pybullet could not load {self.mesh_path}: {exc}") from exc
            body = p.createMultiBody(baseVisualShapeIndex=shape,
                                     basePosition=self.offset.tolist(),
                                     baseOrientation=UP_QUATERNIONS[self.up_axis],
                                     physicsClientId=client)
        except BaseException:
            p.disconnect(client)
            raise
        self._client, self._body = client, body
        self.loads += 1
        return client, body

    def close(self) -> None:
        """Drop the pybullet connection (reopened on the next call)."""
        if self._client is not None:
            try:
                import pybullet as p

                if p.isConnected(physicsClientId=self._client):
                    p.disconnect(self._client)
            except Exception:  # interpreter shutdown: pybullet may be gone already
                pass
            self._client = self._body = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):  # picklable (a Ray actor): the connection is reopened there
        state = self.__dict__.copy()
        state["_client"] = state["_body"] = None
        return state


__all__ = ["NoInversionError", "OraclePrior"]

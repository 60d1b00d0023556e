"""The objects inside one sweep trial: each one's reconstruction, its reports, and the means.

A trial reconstructs every object of the sweep with the trial's sampled settings. Each object
is an :class:`ObjectFit`: in the trial's own process when the sweep has one object, otherwise
a Ray actor in the trial's placement group (a share of the trial's CPUs and GPUs), all of them
on the node's shared prior server. The trial advances every object to the next report step
together, asks each for its metrics, and reports their mean, each object's value and the worst
object (:func:`aggregate`), so ASHA and PBT compare trials on the whole set.

Reports before the last evaluate a fixed subset of held-out views at reduced size
(``rf_core.evaluation.heldout.evaluate_interim``); the last evaluates every view at full size and
the exported mesh (``rf_core.jobs.evaluate_run.evaluate``). The metric names are the same at
every report, so the objective means the same thing throughout.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rf_core.evaluation.heldout import (
    InterimPlan,
    clip_input_similarity,
    evaluate_interim,
    heldout_strip,
    no_surface_metrics,
)
from rf_core.evaluation.metric_registry import (
    CLIP_INPUT_SIMILARITY,
    higher_is_better,
    mesh_metrics,
)
from rf_core.evaluation.preview import preview_object
from rf_core.files.atomic import atomic_write_json
from rf_core.fitting.engine import Callback, fit
from rf_core.fitting.reconstruct import Reconstructor
from rf_core.jobs.embedding_source import with_token
from rf_core.jobs.evaluate_run import evaluate
from rf_core.jobs.export_job import export_run
from rf_core.jobs.job_config import ReconstructJobConfig, config_yaml
from rf_core.progress import quiet

__all__ = ["ObjectFit", "ObjectInputs", "ReportPlan", "aggregate", "objective",
           "start_object_fits"]


@dataclass
class ObjectInputs:
    """What the driver prepared for one object, shared by every trial (object store)."""

    name: str
    rgb: torch.Tensor
    """[3, S, S] the processed photo, over white."""
    mask: torch.Tensor
    """[1, S, S]."""
    token: str
    vector: torch.Tensor | None
    """The object's learned token, from one textual inversion per sweep (None when the prior
    reads no text)."""
    gt: object | None = None
    """``GTViews`` when the object has ground truth."""
    input_view: int = 0


@dataclass(frozen=True)
class ReportPlan:
    """What every report of a sweep computes besides the losses."""

    interim: InterimPlan = field(default_factory=InterimPlan)
    mesh: bool = False
    """Interim reports extract a coarse mesh (the objective weights chamfer_l1 / fscore)."""
    clip_model: str | None = None
    """A located CLIP folder: reports compute ``clip_input_similarity``."""


class ObjectFit:
    """One object's reconstruction in a trial; its methods are what the trial calls, locally
    or on a Ray actor. ``threads``: torch threads (0 keeps the process's setting)."""

    def __init__(self, cfg: ReconstructJobConfig, obj: ObjectInputs, device: str,
                 threads: int = 0, callbacks: list[Callback] = ()):
        if threads:
            torch.set_num_threads(threads)
        from rf_distributed.prior_server import job_prior

        self.cfg, self.obj, self.callbacks = cfg, obj, list(callbacks)
        prior = job_prior(cfg)  # the node's shared server(s)
        if obj.vector is not None:  # None: the prior reads no learned token
            prior.register_embedding(obj.token, obj.vector)
        self.recon = Reconstructor(with_token(cfg.recon, obj.token), obj.rgb, obj.mask, prior,
                                   device=device)

    def load_state(self, state: dict) -> int:
        """Continue from a checkpoint's state; returns the step it is at."""
        self.recon.load_state_dict(state)
        return self.recon.step_count

    def step_count(self) -> int:
        return self.recon.step_count

    def advance(self, until: int) -> dict:
        """Step to ``until`` (the next report step); the last step's metrics."""
        return fit(self.recon, until, self.callbacks).metrics

    def state(self) -> dict:
        return self.recon.state_dict()

    def config_text(self) -> str:
        return config_yaml(self.cfg)

    def interim_metrics(self, plan: ReportPlan) -> dict[str, float]:
        """Input-view metrics, and with ground truth the held-out ones on the plan's fixed
        subset at reduced size; CLIP similarity to the photo when the plan asks for it."""
        if self.obj.gt is None:
            metrics = dict(self.recon.input_view_metrics())
        else:
            metrics = evaluate_interim(self.recon, self.obj.gt, self.obj.input_view,
                                       plan.interim, mesh=plan.mesh,
                                       threshold=self.cfg.export.threshold)
        return {**metrics, **self._clip(plan)}

    def preview(self, plan: ReportPlan) -> dict[str, np.ndarray]:
        """This report's preview images (``rf_core.evaluation.preview.preview_object``): a 6-frame
        orbit and the held-out strip at the interim size (at least 48 px), and the coarse mesh.
        Their cost is about twice an interim evaluation's, mostly the orbit."""
        return preview_object(self.recon, self.cfg.export, self.obj.gt, self.obj.input_view,
                              plan.interim, frames=6, size=max(48, plan.interim.size))

    def final(self, plan: ReportPlan) -> tuple[dict, dict[str, bytes]]:
        """Export video and mesh, evaluate every view at full size and the mesh, and draw
        the held-out strip (GT | ours). Returns (metrics, {relative path: bytes})."""
        with tempfile.TemporaryDirectory(prefix="rf-object-") as tmp:
            folder = Path(tmp)
            with quiet():  # in the trainable: the sweep's console shows reports, not bars
                export_run(self.recon, self.cfg.export, folder)
            metrics = evaluate(self.recon, self.obj.gt, self.obj.input_view,
                               folder / "mesh.glb")
            metrics.update(self._clip(plan))
            no_surface = not any(m in metrics for m in mesh_metrics())
            if self.obj.gt is not None and no_surface:
                metrics.update(no_surface_metrics(self.recon, self.obj.gt, self.obj.input_view))
            if self.obj.gt is not None:
                import imageio.v3 as iio

                iio.imwrite(folder / "heldout.png",
                            heldout_strip(self.recon, self.obj.gt, self.obj.input_view))
            (folder / "config.yaml").write_text(self.config_text())
            atomic_write_json(folder / "metrics.json", metrics)
            files = {f.relative_to(folder).as_posix(): f.read_bytes()
                     for f in sorted(folder.rglob("*")) if f.is_file()}
        return metrics, files

    def _clip(self, plan: ReportPlan) -> dict[str, float]:
        if plan.clip_model is None:
            return {}
        return {CLIP_INPUT_SIMILARITY: clip_input_similarity(self.recon, self.obj.rgb,
                                                             Path(plan.clip_model))}


class _Local:
    """An ``ObjectFit`` in this process, with the calling convention of an actor handle."""

    def __init__(self, fit_: ObjectFit):
        self._fit = fit_

    def call(self, method: str, *args):
        return getattr(self._fit, method)(*args)


class _Remote:
    """An ``ObjectFit`` Ray actor: ``call`` returns an ObjectRef."""

    def __init__(self, actor):
        self._actor = actor

    def call(self, method: str, *args):
        return getattr(self._actor, method).remote(*args)


class ObjectFits:
    """Every object of one trial; each method runs on all of them at once (in parallel on
    actors) and returns ``{object name: result}``."""

    def __init__(self, names: list[str], handles: list):
        self.names, self.handles = names, handles

    def run(self, method: str, *per_object_args) -> dict:
        import ray

        calls = [h.call(method, *(a[i] for a in per_object_args))
                 for i, h in enumerate(self.handles)]
        results = [ray.get(c) if isinstance(c, ray.ObjectRef) else c for c in calls]
        return dict(zip(self.names, results))

    def same(self, method: str, *args) -> dict:
        """``method(*args)`` on every object."""
        return self.run(method, *([a] * len(self.names) for a in args))


def start_object_fits(cfgs: list[ReconstructJobConfig], objects: list[ObjectInputs],
                      resources: dict[str, float], callbacks: list[Callback]) -> ObjectFits:
    """One ``ObjectFit`` per object: in this process for a single object, else one Ray actor
    each with an equal share of the trial's ``resources`` (``cpu``, ``gpu``), which Tune
    reserved as that many bundles of the trial's placement group."""
    cpu, gpu = float(resources.get("cpu", 1)), float(resources.get("gpu", 0))
    device = "cuda" if gpu > 0 and torch.cuda.is_available() else "cpu"
    names = [o.name for o in objects]
    if len(objects) == 1:
        return ObjectFits(names, [_Local(ObjectFit(cfgs[0], objects[0], device,
                                                   max(1, int(cpu)), callbacks))])
    import ray

    share = object_share(resources, len(objects))
    actor = ray.remote(ObjectFit).options(num_cpus=share["cpu"], num_gpus=share["gpu"],
                                          max_restarts=0)
    threads = max(1, int(share["cpu"]))
    return ObjectFits(names, [_Remote(actor.remote(c, o, device, threads, callbacks))
                              for c, o in zip(cfgs, objects)])


def object_share(resources: dict[str, float], n: int) -> dict[str, float]:
    """Each object's actor's share of a trial's ``cpu`` and ``gpu`` (Ray counts in 1e-4)."""
    return {k: math.floor(float(resources.get(k, 0)) / n * 1e4) / 1e4 for k in ("cpu", "gpu")}


def aggregate(per_object: dict[str, dict], per_object_keys: bool = True) -> dict[str, float]:
    """Mean over objects of every numeric metric, plus (``per_object_keys``) each object's
    value as ``<metric>/<object>`` and the worst object's as ``<metric>/worst``. Losses get
    the mean only. A metric missing for some object is averaged over those that have it."""
    keys: dict[str, None] = {}
    for metrics in per_object.values():
        keys.update(dict.fromkeys(k for k, v in metrics.items() if _number(v)))
    out: dict[str, float] = {}
    for key in keys:
        values = {name: float(m[key]) for name, m in per_object.items() if _number(m.get(key))}
        out[key] = float(np.mean(list(values.values())))
        if per_object_keys and not key.startswith("loss/"):
            for name, value in values.items():
                out[f"{key}/{name}"] = value
            pick = min if higher_is_better(key) else max
            out[f"{key}/worst"] = pick(values.values())
    return out


def objective(metrics: dict, weights: dict[str, float], mode: str = "max") -> float:
    """Weighted sum of the objective's metrics. Every weighted metric must be reported
    (``SweepSpec`` checks at start that it can be); a non-finite one ranks the trial last
    (-inf when Tune maximises, +inf when it minimises)."""
    missing = [k for k in weights if k not in metrics]
    if missing:
        raise KeyError(f"objective metric {missing[0]!r} was not reported (reported: "
                       f"{', '.join(sorted(k for k in metrics if '/' not in k))})")
    values = [w * float(metrics[k]) for k, w in weights.items()]
    if all(math.isfinite(v) for v in values):
        return float(sum(values))
    return -math.inf if mode == "max" else math.inf


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

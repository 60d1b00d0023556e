"""``rf bench step``: what one reconstruction step does, counted on any device.

Two variants of one preset, counted on the same fields: ``optimised`` (the preset as shipped)
runs its trajectory, and at step 0 and at every steady-state step ``baseline`` (every
work-saving switch off: the behaviour before they existed) first takes the same step from the
same state (a fresh ``Reconstructor`` loaded with the optimised one's ``state_dict``). Paired
this way the counts compare work on identical fields; two independent runs would compare two
different fields (their trajectories part after the first step). Per step it records

- hash-grid point evaluations, for rendering (``grid_points``) and for normals' finite-difference
  probes (``probe_points``) apart, and point x computed-level products (``level_points``),
  from the field's and the encoding's own counters (occupancy refreshes, a known
  ``resolution^3`` points on the steps that refresh, are reported apart as
  ``occupancy_points``);
- samples per rendered ray that reach the field;
- UNet and VAE-encoder calls (forward hooks on the prior's modules, when it has them);
- host syncs (``rf_bench.syncs.SyncCounter``) and peak tensor memory above the step's start
  plus the field's and optimizer's own tensors (``rf_bench.syncs.peak_memory``), on probe
  steps: the first two (warm-up) and three in the steady state (profiling slows a step, so
  probe steps are left out of the timings);
- wall time per step.

It reports the warm-up maximum (steps before the steady state; the baseline's is its step 0,
where every cell of the occupancy grid still counts as occupied) and the steady state (the
mean over steps >= ``steady_from``, 50 by default). The photo is ``synthetic_photo`` (a
shaded disc), whose mask covers half the view, as an object photo's does.

On the CPU the baseline's warm-up (every cell occupied until the first occupancy refresh)
needs ~25 GB at the realfusion preset, more than a 24 GB machine has: there its warm-up steps
render ``baseline_warmup_fraction`` of the rays and their points and memory are scaled up by
its inverse (``warmup_extrapolated`` in the JSON). Steady-state steps always run at full size.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields

import torch

from rf_bench.syncs import SyncCounter, peak_memory

BASELINE_SWITCHES = (
    "recon.renderer.early_stop_eps=0",
    "recon.renderer.normals_min_weight=0",
    "recon.renderer.occupancy.init_from_field=false",
    "recon.renderer.min_step=0",
    "recon.field.normal_difference=central",
)
"""Overrides that turn every work-saving switch off (the behaviour before they existed)."""

GB = 1024 ** 3


def baseline_switches() -> list[str]:
    """:data:`BASELINE_SWITCHES`, plus the hash grid's level skipping where it has a switch."""
    from rf_core.scene.encoding import HashGridConfig

    names = {f.name for f in fields(HashGridConfig)}
    extra = ["recon.field.grid.skip_masked_levels=false"] if "skip_masked_levels" in names \
        else []
    return [*BASELINE_SWITCHES, *extra]


def _hook_counts(prior) -> tuple[dict[str, int], list]:
    """Count calls of the prior's UNet and VAE encoder (when it has them)."""
    counts = {"unet": 0, "vae": 0}
    handles = []
    sd = getattr(prior, "sd", None)
    for name, module in (("unet", getattr(sd, "unet", None)),
                         ("vae", getattr(getattr(sd, "vae", None), "encoder", None))):
        if isinstance(module, torch.nn.Module):
            def hook(*_, _name=name):
                counts[_name] += 1
            handles.append(module.register_forward_hook(hook))
    return counts, handles


def _state_bytes(recon) -> int:
    """Bytes of the field's parameters and gradients' room, the optimizer state and the
    occupancy grid: what a step's allocations come on top of."""
    tensors = list(recon.field.parameters()) + list(recon.renderer.occupancy.buffers())
    for state in recon.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    params = sum(p.numel() * p.element_size() for p in recon.field.parameters())
    return sum(t.numel() * t.element_size() for t in tensors) + params  # + gradients


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(recon, step: int, calls: dict[str, int], device: torch.device, probe: bool,
                 warmup_fraction: float = 1.0) -> dict:
    """Take one step of ``recon`` and count it: the row of :func:`summarise`.

    ``probe``: profile memory and count syncs (the step is then not timed). A warm-up step
    (every cell occupied) runs ``warmup_fraction`` of the rays when below 1, its counts and
    memory scaled up by the inverse.
    """
    rc, occ = recon.cfg, recon.cfg.renderer.occupancy
    full = (rc.input_rays, rc.sds_size)
    refresh = occ.enabled and ((step == 0 and occ.init_from_field) or (
        step >= occ.warmup_steps and step % occ.update_every == 0))
    warm = not occ.init_from_field and step < occ.warmup_steps
    scale = 1.0
    if warm and warmup_fraction < 1.0:
        rc.input_rays = max(1, round(full[0] * warmup_fraction))
        rc.sds_size = max(8, round(full[1] * warmup_fraction ** 0.5))
        scale = (full[0] + rc.sds_batch * full[1] ** 2) / (
            rc.input_rays + rc.sds_batch * rc.sds_size ** 2)
    try:
        rays = (rc.input_rays or recon.target_rgb.shape[0]) + rc.sds_batch * rc.sds_size ** 2
        recon.field.reset_counters()
        before = dict(calls)
        row: dict = {"step": step, "scale": scale}
        _sync(device)
        if probe:
            with peak_memory(device) as mem, SyncCounter(device, trace=True) as syncs:
                metrics = recon.step()
            row.update(peak_bytes=mem["bytes"] * scale + _state_bytes(recon),
                       memory_method=mem["method"], syncs=syncs.total,
                       syncs_by_kind=dict(syncs.by_kind), syncs_by_site=dict(syncs.by_site))
        else:
            t0 = time.perf_counter()
            metrics = recon.step()
            _sync(device)
            row["step_s"] = time.perf_counter() - t0
    finally:
        rc.input_rays, rc.sds_size = full
    occupancy_points = occ.resolution ** 3 if refresh else 0
    fwd = recon.field.points_forward - occupancy_points
    row.update(grid_points=fwd * scale, probe_points=recon.field.points_normal_probes * scale,
               level_points=recon.field.encoding.level_evaluations * scale,
               occupancy_points=occupancy_points, samples_per_ray=fwd / rays,
               unet_calls=calls["unet"] - before["unet"], vae_calls=calls["vae"] - before["vae"],
               sds_nonfinite=metrics.get("sds/nonfinite", 0.0),
               march_dropped=metrics.get("march/dropped", 0.0),
               march_share=metrics.get("march/share"),
               amp_scale=metrics.get("amp/scale"))
    return row


def run_paired(cfg, baseline_cfg, prior, device: torch.device, steps: int, steady_from: int,
               baseline_warmup_fraction: float = 1.0, progress=print) -> dict[str, dict]:
    """Step ``cfg``'s reconstruction ``steps`` times; at step 0 and at every steady-state step,
    first take the same step with ``baseline_cfg`` from the same state (a fresh
    ``Reconstructor`` loaded with its ``state_dict``: same field, occupancy, optimizer and
    random streams), so both variants are counted on identical fields.

    Returns {"baseline": summary, "optimised": summary} (:func:`summarise`).
    """
    from rf_bench.prior import synthetic_photo
    from rf_core.fitting.reconstruct import Reconstructor

    rgb, mask = synthetic_photo(cfg.recon.input_size)
    recon = Reconstructor(cfg.recon, rgb, mask, prior, device=device)
    calls, handles = _hook_counts(prior)
    probes = {0, 1, steady_from, steady_from + 1, steady_from + 2}
    paired = {0, *range(steady_from, steps)}
    rows: dict[str, list] = {"baseline": [], "optimised": []}
    try:
        for step in range(steps):
            if step in paired:
                shadow = Reconstructor(baseline_cfg.recon, rgb, mask, prior, device=device)
                shadow.load_state_dict(recon.state_dict())
                row = measure_step(shadow, step, calls, device, step in probes,
                                   baseline_warmup_fraction)
                rows["baseline"].append(row)
                del shadow
                progress(f"  baseline  step {step}: {_points(row):,.0f} grid points, "
                         f"{row.get('step_s', float('nan')):.2f} s")
            row = measure_step(recon, step, calls, device, step in probes)
            rows["optimised"].append(row)
            if step in paired or step % 10 == 0:
                progress(f"  optimised step {step}: {_points(row):,.0f} grid points, "
                         f"{row.get('step_s', float('nan')):.2f} s")
    finally:
        for h in handles:
            h.remove()
    return {"baseline": summarise(rows["baseline"], steady_from, baseline_warmup_fraction),
            "optimised": summarise(rows["optimised"], steady_from, 1.0,
                                   recon.nonfinite_steps + recon.scaler_skipped_steps)}


def _points(row: dict) -> float:
    return row["grid_points"] + row["probe_points"] + row["occupancy_points"]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict], steady_from: int, warmup_fraction: float,
              skipped_steps: int | None = None) -> dict:
    """Warm-up maxima and steady-state means of the per-step rows."""
    warm = [r for r in rows if r["step"] < steady_from]
    steady = [r for r in rows if r["step"] >= steady_from] or rows[len(rows) // 2:]

    total = _points
    memory = [r for r in rows if "peak_bytes" in r]
    return {
        "grid_points_per_step": _mean([total(r) for r in steady]),
        "render_points_per_step": _mean([r["grid_points"] for r in steady]),
        "normal_probe_points_per_step": _mean([r["probe_points"] for r in steady]),
        "occupancy_points_per_step": _mean([r["occupancy_points"] for r in steady]),
        "level_points_per_step": _mean([r["level_points"] for r in steady]),
        "samples_per_ray": _mean([r["samples_per_ray"] for r in steady]),
        "unet_calls_per_step": _mean([r["unet_calls"] for r in steady]),
        "vae_calls_per_step": _mean([r["vae_calls"] for r in steady]),
        "syncs_per_step": _mean([r["syncs"] for r in steady if "syncs" in r]),
        "march_dropped_per_step": _mean([r["march_dropped"] for r in steady]),
        "march_share": _mean([r["march_share"] for r in steady
                              if r.get("march_share") is not None]),
        "syncs_by_kind": next((r["syncs_by_kind"] for r in reversed(steady)
                               if "syncs_by_kind" in r), {}),
        "syncs_by_site": next((r["syncs_by_site"] for r in reversed(steady)
                               if "syncs_by_site" in r), {}),
        "step_s": _mean([r["step_s"] for r in steady if "step_s" in r]),
        "warmup_grid_points_max": max((total(r) for r in warm), default=None),
        "warmup_peak_mem_gb": max((r["peak_bytes"] for r in memory
                                   if r["step"] < steady_from), default=0) / GB,
        "steady_peak_mem_gb": max((r["peak_bytes"] for r in memory
                                   if r["step"] >= steady_from), default=0) / GB,
        "memory_method": memory[0]["memory_method"] if memory else None,
        "warmup_extrapolated": warmup_fraction < 1.0,
        "sds_nonfinite_total": sum(r["sds_nonfinite"] for r in rows),
        "amp_scale_last": rows[-1]["amp_scale"] if rows else None,
        "skipped_steps": skipped_steps,
        "steps": len(rows),
        "rows": rows,
    }


def run_step_bench(preset: str = "realfusion", model: str = "tiny", steps: int = 60,
                   device: str = "auto", json_path: str | None = None,
                   overrides: list[str] | None = None, steady_from: int = 50,
                   baseline_warmup_fraction: float | None = None, progress=print) -> dict:
    """Baseline and optimised variants of ``preset`` with ``model``, side by side.

    Returns ``{"baseline": {...}, "optimised": {...}, "ratios": {...}, ...}``; each variant
    has ``grid_points_per_step``, ``warmup_peak_mem_gb``, ``syncs_per_step`` and ``step_s``.
    """
    from rf_core.jobs.job_config import load_job_config
    from rf_core.prior.registry import make_prior

    dev = torch.device(device if device != "auto" else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    if steps <= steady_from:
        steady_from = max(1, steps // 2)
    base = [f"model.name={model}", f"model.device={dev.type}", *(overrides or [])]
    if baseline_warmup_fraction is None:
        baseline_warmup_fraction = 1.0 if dev.type == "cuda" else 0.25
    result: dict = {"preset": preset, "model": model, "device": dev.type, "steps": steps,
                    "steady_from": steady_from, "overrides": overrides or [],
                    "method": "paired: the optimised run's trajectory; at step 0 and every "
                              "step >= steady_from the baseline takes the same step from the "
                              "same state"}
    cfg = load_job_config(preset, overrides=base)
    baseline_cfg = load_job_config(preset, overrides=[*base, *baseline_switches()])
    prior = make_prior(cfg.model)
    _register_token(prior, cfg.recon.prompt.token)
    progress(f"rf bench step: {preset}, {model}, {dev.type}, {steps} steps (baseline paired "
             f"at step 0 and steps >= {steady_from})")
    result.update(run_paired(cfg, baseline_cfg, prior, dev, steps, steady_from,
                             baseline_warmup_fraction, progress))
    result["baseline"]["overrides"] = baseline_switches()
    result["optimised"]["overrides"] = []
    b, o = result["baseline"], result["optimised"]

    def ratio(key):
        return b[key] / o[key] if b.get(key) and o.get(key) else None

    result["ratios"] = {k: ratio(k) for k in ("grid_points_per_step", "warmup_peak_mem_gb",
                                              "syncs_per_step", "step_s")}
    if json_path:
        _write(json_path, result)
    return result


def _register_token(prior, token: str) -> None:
    """A stand-in learned token (the mean embedding), so prompts with it encode."""
    sd = getattr(prior, "sd", None)
    if sd is not None and hasattr(prior, "register_embedding"):
        rows = sd.text_encoder.get_input_embeddings().weight
        prior.register_embedding(token, rows.detach().float().mean(0).to(rows.dtype))


def _write(path: str, result: dict) -> None:
    from pathlib import Path

    from rf_core.files.atomic import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(result, indent=2, default=str))


def format_step_table(result: dict) -> str:
    """Markdown table: one row per quantity, baseline | optimised | ratio."""
    rows = [("hash-grid points / step (total)", "grid_points_per_step", ",.0f"),
            ("  rendering", "render_points_per_step", ",.0f"),
            ("  normal probes", "normal_probe_points_per_step", ",.0f"),
            ("  occupancy refresh (amortised)", "occupancy_points_per_step", ",.0f"),
            ("point x computed levels / step", "level_points_per_step", ",.0f"),
            ("samples per ray reaching the field", "samples_per_ray", ".1f"),
            ("UNet calls / step", "unet_calls_per_step", ".2f"),
            ("VAE encoder calls / step", "vae_calls_per_step", ".2f"),
            ("host syncs / step", "syncs_per_step", ".1f"),
            ("march: later segments' share", "march_share", ".3f"),
            ("march: samples dropped / step", "march_dropped_per_step", ",.0f"),
            ("warm-up max grid points / step", "warmup_grid_points_max", ",.0f"),
            ("warm-up peak memory (GB)", "warmup_peak_mem_gb", ".2f"),
            ("steady peak memory (GB)", "steady_peak_mem_gb", ".2f"),
            ("step time (s)", "step_s", ".3f")]
    b, o = result["baseline"], result["optimised"]
    out = [f"rf bench step: {result['preset']} preset, {result['model']} model, "
           f"{result['device']}, steady state = mean over steps >= {result['steady_from']}",
           "", "| per step | baseline | optimised | baseline / optimised |", "|---|---|---|---|"]
    for label, key, spec in rows:
        bv, ov = b.get(key), o.get(key)
        r = f"{bv / ov:.2f}x" if bv and ov else "-"
        out.append(f"| {label} | {format(bv, spec) if bv is not None else '-'} | "
                   f"{format(ov, spec) if ov is not None else '-'} | {r} |")
    notes = [f"memory: {b.get('memory_method')}; field, optimizer and occupancy tensors plus "
             "the step's peak allocations (the prior's weights are not counted)"]
    if b.get("warmup_extrapolated"):
        notes.append("baseline warm-up: run at a fraction of the rays on this machine and "
                     "scaled up (its full size needs more memory than the machine has)")
    notes.append(f"optimised syncs by kind (last steady probe): {o.get('syncs_by_kind')}")
    notes += [f"  {n} x {site}" for site, n in sorted(o.get("syncs_by_site", {}).items())]
    return "\n".join(out + [""] + notes)

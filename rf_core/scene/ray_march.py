"""Marching rays front to back with shapes the host knows: the renderer's only host sync.

The field is evaluated only at samples in occupied cells, in ``segments`` along the rays, and
a segment is skipped on rays that are already opaque (transmittance below ``eps``). Gathering
those samples with ``nonzero`` would wait for the device twice per segment and render call.
Instead:

* :func:`plan_rays` finds the active samples of each segment and counts them on the device;
  :func:`read_counts` reads the counts of every plan of a training step in one transfer (the
  step's one sync before its metrics).
* The first segment's samples are then gathered with :func:`compact`, whose size the host
  knows. Later segments keep a *share* of their active samples, chosen by ``topk`` of their
  ray's transmittance (the most transparent rays first): when the share covers the samples
  of rays still alive, the result equals the exact march (those of dead rays that fill the
  share are evaluated but weighted zero); when it falls short, the samples dropped are those of the
  most opaque rays still alive, and their count is reported (``dropped``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rf_core.host_sync import to_host


@dataclass
class RayPlan:
    """Where N rays take their S samples, before the field is asked anything."""

    t: torch.Tensor
    """[N, S] distance of each sample along its ray."""
    deltas: torch.Tensor
    """[N, S] length of each sample's interval (0 past the end of a short chord)."""
    x: torch.Tensor
    """[N, S, 3] sample positions."""
    active: torch.Tensor
    """[N, S] bool: in an occupied cell, on a ray that hits the box."""
    edges: list[int]
    """Segment boundaries along the samples: 0 = e_0 < ... < e_k = S."""
    device_counts: torch.Tensor
    """[k] active samples per segment (on the device)."""
    counts: list[int] | None = None
    """``device_counts`` on the host, once read (:func:`read_counts`)."""


def plan_rays(t: torch.Tensor, deltas: torch.Tensor, x: torch.Tensor, active: torch.Tensor,
              segments: int) -> RayPlan:
    """A :class:`RayPlan` whose ``segments`` segments split the S samples evenly."""
    s = active.shape[1]
    k = max(1, min(segments, s))
    edges = [round(i * s / k) for i in range(k + 1)]
    counts = torch.stack([active[:, a:b].sum() for a, b in zip(edges[:-1], edges[1:])])
    return RayPlan(t, deltas, x, active, edges, counts)


def read_counts(plans: Sequence[RayPlan]) -> None:
    """Read every plan's segment counts to the host in one transfer (one host sync)."""
    todo = [p for p in plans if p.counts is None]
    if not todo:
        return
    values = to_host(torch.cat([p.device_counts for p in todo]))
    at = 0
    for p in todo:
        k = p.device_counts.numel()
        p.counts = [int(v) for v in values[at:at + k]]
        at += k


def compact(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the first ``size`` True entries of ``mask`` [K], in order: [size].

    ``nonzero`` without the host sync, for a count the host already knows (a scatter of each
    entry's rank; entries past ``size`` land in a discarded slot)."""
    rank = torch.cumsum(mask, 0) - 1
    slot = torch.where(mask & (rank < size), rank, size)
    out = torch.zeros(size + 1, dtype=torch.long, device=mask.device)
    return out.index_put((slot,), torch.arange(mask.numel(), device=mask.device))[:size]


@dataclass
class Marched:
    """What :func:`march` evaluated: M samples over N rays of S."""

    flat: torch.Tensor
    """[M] flat indices (into N*S) of the evaluated samples."""
    sigma: torch.Tensor
    """[M] densities (fp32)."""
    albedo: torch.Tensor
    """[M, 3] albedos (fp32)."""
    weights: torch.Tensor
    """[N, S] compositing weights (zero at samples not evaluated, or on dead rays)."""
    wanted: torch.Tensor
    """[k] per segment, the samples a complete march evaluates (alive rays' active ones):
    what the next shares should cover (on the device)."""
    dropped: torch.Tensor
    """[] samples of alive rays that the shares left out (on the device)."""


def march(plan: RayPlan, field_fn: Callable, eps: float,
          shares: Sequence[float] | None = None) -> Marched:
    """Evaluate ``plan``'s active samples front to back, segment by segment.

    ``eps``: rays whose transmittance fell below it skip the later segments (0: none do).
    ``shares``: for segments 2..k, the share of their active samples to evaluate, chosen
    without a host sync (None: exactly the alive rays' samples, found with ``nonzero``).
    ``plan.counts`` must have been read (:func:`read_counts`).
    """
    if plan.counts is None:
        read_counts([plan])
    n, s = plan.active.shape
    points, flat_deltas = plan.x.reshape(-1, 3), plan.deltas.reshape(-1)
    trans = torch.ones(n, device=plan.x.device)  # in the graph: later weights depend on it
    flats, sigmas, albedos, weights, wanted = [], [], [], [], []
    dropped = torch.zeros((), device=plan.x.device)
    bounds = list(zip(plan.edges[:-1], plan.edges[1:]))
    for j, ((a, b), count) in enumerate(zip(bounds, plan.counts)):
        m = b - a
        cand = plan.active[:, a:b].reshape(-1)
        if j == 0 or eps <= 0:
            local, live = compact(cand, count), None
            wanted.append(torch.full((), count, device=plan.x.device))
        else:
            ray_trans = trans.detach()
            alive = (ray_trans > eps)[:, None].expand(n, m).reshape(-1) & cand
            wanted.append(alive.sum())
            if shares is None or j - 1 >= len(shares):
                local = alive.nonzero().squeeze(-1)  # exact: a host sync
                live = None
            elif (keep := min(count, math.ceil(shares[j - 1] * count))) >= count:
                local = compact(cand, count)
                live = alive[local]
            else:
                priority = torch.where(cand, ray_trans[:, None].expand(n, m).reshape(-1), -1.0)
                local = torch.topk(priority, keep, sorted=False).indices
                live = alive[local]
            if live is not None:
                dropped = dropped + (wanted[-1] - live.sum()).clamp(min=0)
        flat = local // m * s + local % m + a
        sigma_a, albedo_a = evaluate(field_fn, points[flat])
        tau_a = sigma_a * flat_deltas[flat]
        if live is not None:
            tau_a = torch.where(live, tau_a, 0.0)
        tau = torch.zeros(n * m, device=plan.x.device, dtype=sigma_a.dtype)
        tau = tau.index_put((local,), tau_a).view(n, m)
        cum = torch.cumsum(tau, dim=-1)
        weights.append(trans[:, None] * torch.exp(-(cum - tau)) * (1.0 - torch.exp(-tau)))
        trans = trans * torch.exp(-cum[:, -1])
        flats.append(flat)
        sigmas.append(sigma_a)
        albedos.append(albedo_a)
    return Marched(torch.cat(flats), torch.cat(sigmas), torch.cat(albedos),
                   torch.cat(weights, 1), torch.stack(wanted).float(), dropped)


def evaluate(field_fn, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """field_fn at xs [M, 3] -> density [M], albedo [M, 3] in fp32 (called even for M = 0,
    which keeps the loss connected to the field's parameters).

    Under autocast the field answers in fp16/bf16; compositing (a cumulative sum of optical
    depth along each ray, then sums over samples) needs fp32.
    """
    sigma, albedo = field_fn(xs)
    return sigma.float(), albedo.float()

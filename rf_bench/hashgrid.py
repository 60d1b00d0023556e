"""Hash-grid throughput: every available backend and the naive reference, in one run.

``rf bench hashgrid --json OUT.json`` measures points per second of the forward pass and of
forward + backward (parameter gradients) at each size, on the CPU and, when present, CUDA
(Triton and tcnn run there; on the CPU Triton runs only interpreted, under
``TRITON_INTERPRET=1``, whose speed means nothing), the largest difference of every backend
from the reference and of the fused ones from the torch path, and why a backend was skipped.
With ``active_levels`` it also times the backends that skip masked coarse-to-fine levels
(torch, triton) with only that many levels computed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch

from rf_bench.common import device_name, median_time, write_json
from rf_core.scene.encoding import HashGridConfig, available_backends
from rf_core.scene.encoding.backends import (
    TCNN_INSTALL_HINT,
    tcnn_import_error,
    triton_interpreting,
    triton_unusable_reason,
)
from rf_core.scene.encoding.layout import grid_layout
from rf_core.scene.encoding.reference import hashgrid_reference
from rf_core.scene.encoding.torch_backend import TorchHashGrid

__all__ = ["Encode", "bench_device", "encoders", "format_table", "run_hashgrid_bench",
           "skipped_backends"]

Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""An encoder as the benchmark calls it: ``(x [N, 3], params [P]) -> features [N, L*F]``."""


def encoders(cfg: HashGridConfig, device: torch.device) -> dict[str, Encode]:
    """Every backend usable on ``device`` (torch; triton on CUDA, or interpreted on the CPU;
    tcnn on CUDA when it imports) and the naive reference, by name, all reading the same flat
    parameter vector."""
    layout = grid_layout(cfg)
    found: dict[str, Encode] = {"torch": TorchHashGrid(layout).to(device)}
    if triton_unusable_reason(device) is None:
        from rf_core.scene.encoding.triton_backend import TritonHashGrid

        found["triton"] = TritonHashGrid(layout).to(device)
    if device.type == "cuda" and "tcnn" in available_backends(device):
        from rf_core.scene.encoding.tcnn_backend import TcnnHashGrid

        found["tcnn"] = TcnnHashGrid(cfg, layout)
    found["reference"] = lambda x, p: hashgrid_reference(x, p, layout)
    return found


def skipped_backends(device: torch.device) -> dict[str, str]:
    """Backends that do not run on ``device``, with the reason (one line each)."""
    skipped = {}
    reason = triton_unusable_reason(device)
    if reason is not None:
        skipped["triton"] = reason
    if device.type != "cuda":
        skipped["tcnn"] = "tiny-cuda-nn runs only on CUDA"
    elif "tcnn" not in available_backends(device):
        skipped["tcnn"] = f"{tcnn_import_error() or 'CUDA unavailable'}; {TCNN_INSTALL_HINT}"
    return skipped


def bench_device(cfg: HashGridConfig, device: torch.device, sizes: Sequence[int],
                 repeats: int, reference_repeats: int,
                 active_levels: int | None = None) -> tuple[list[dict], list[dict]]:
    """Time forward and forward + backward of every encoder at each size on ``device``.

    With ``active_levels``, torch and triton are also timed with only that many (coarsest)
    levels computed, as rows named ``"torch@k"`` / ``"triton@k"``.

    Returns (rows: one per backend and size, with seconds and points/s; accuracy: each
    backend's largest value and gradient difference from the reference, then the fused
    backends' from the torch path).
    """
    layout = grid_layout(cfg)
    gen = torch.Generator().manual_seed(0)
    # O(1) parameters, so the reported differences are relative to features of size ~1.
    params = (torch.rand(layout.n_params, generator=gen) * 2 - 1).to(device).requires_grad_()
    by_name = encoders(cfg, device)
    if active_levels is not None and active_levels < layout.n_levels:
        for name in ("torch", "triton"):
            if name in by_name:
                by_name[f"{name}@{active_levels}"] = functools.partial(
                    by_name[name], active_levels=active_levels)
    interpreted = device.type == "cpu" and triton_interpreting()
    rows, accuracy = [], []
    for n in sizes:
        x = torch.rand(n, 3, generator=gen).to(device)
        upstream = (torch.rand(n, layout.n_levels * layout.n_features, generator=gen) * 2 - 1
                    ).to(device)
        results = {}
        for name, encode in by_name.items():
            reps = reference_repeats if name == "reference" else repeats

            def forward(encode=encode, x=x):
                with torch.no_grad():
                    return encode(x, params)

            def forward_backward(encode=encode, x=x, upstream=upstream):
                out = encode(x, params)
                return out.detach(), torch.autograd.grad(out, params, upstream)[0]

            t_fwd, _ = median_time(forward, device, reps)
            t_fb, results[name] = median_time(forward_backward, device, reps)
            row = {"device": device.type, "backend": name, "n_points": n, "repeats": reps,
                   "forward_s": t_fwd, "forward_backward_s": t_fb,
                   "forward_points_per_s": n / t_fwd, "forward_backward_points_per_s": n / t_fb}
            if interpreted and name.startswith("triton"):
                row["interpreted"] = True  # Triton's CPU interpreter: parity only, not speed
            rows.append(row)
        pairs = [(name, "reference") for name in results if "@" not in name
                 and name != "reference"]
        pairs += [(name, "torch") for name in ("triton", "tcnn") if name in results]
        for name, against in pairs:
            (out, grad), (ref_out, ref_grad) = results[name], results[against]
            accuracy.append({
                "device": device.type, "n_points": n, "backend": name, "against": against,
                "max_abs_value_diff": (out - ref_out).abs().max().item(),
                "max_abs_grad_diff": (grad - ref_grad).abs().max().item(),
                "max_abs_grad": ref_grad.abs().max().item(),
            })
        del results
    return rows, accuracy


def _speedups(rows: list[dict]) -> list[dict]:
    ref = {(r["device"], r["n_points"]): r for r in rows if r["backend"] == "reference"}
    out = []
    for r in rows:
        base = ref.get((r["device"], r["n_points"]))
        if base is None or r["backend"] == "reference":
            continue
        out.append({"device": r["device"], "backend": r["backend"], "n_points": r["n_points"],
                    "forward": base["forward_s"] / r["forward_s"],
                    "forward_backward": base["forward_backward_s"] / r["forward_backward_s"]})
    return out


def format_table(report: dict) -> str:
    """The report as a plain-text table."""
    cfg = report["config"]
    lines = [f"hash grid: L={cfg['n_levels']} F={cfg['n_features_per_level']}"
             f" T=2^{cfg['log2_hashmap_size']}  torch {report['torch_version']}"
             f"  threads {report['threads']}"]
    for dev, name in report["devices"].items():
        lines.append(f"  {dev}: {name}")
    speed = {(s["device"], s["backend"], s["n_points"]): s for s in report["speedup"]}
    header = (f"{'device':<6} {'backend':<10} {'points':>8} {'fwd ms':>9} {'fwd Mpt/s':>10} "
              f"{'f+b ms':>9} {'f+b Mpt/s':>10} {'f+b vs ref':>10}")
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        s = speed.get((r["device"], r["backend"], r["n_points"]))
        ratio = f"{s['forward_backward']:.1f}x" if s else "-"
        note = "  (interpreted)" if r.get("interpreted") else ""
        lines.append(f"{r['device']:<6} {r['backend']:<10} {r['n_points']:>8} "
                     f"{r['forward_s'] * 1e3:>9.1f} {r['forward_points_per_s'] / 1e6:>10.2f} "
                     f"{r['forward_backward_s'] * 1e3:>9.1f} "
                     f"{r['forward_backward_points_per_s'] / 1e6:>10.2f} {ratio:>10}{note}")
    for a in report["accuracy"]:
        lines.append(f"{a['device']} {a['backend']} vs {a.get('against', 'reference')} at "
                     f"{a['n_points']}: "
                     f"max |value diff| {a['max_abs_value_diff']:.2e}, max |grad diff| "
                     f"{a['max_abs_grad_diff']:.2e} (max |grad| {a['max_abs_grad']:.1f})")
    for sk in report.get("skipped", []):
        lines.append(f"{sk['device']} {sk['backend']}: skipped ({sk['reason']})")
    return "\n".join(lines)


def run_hashgrid_bench(json_path: str | None = None, sizes: Sequence[int] = (2**16, 2**18),
                       repeats: int = 5, cfg: HashGridConfig | None = None,
                       reference_repeats: int = 2, active_levels: int | None = None) -> dict:
    """Benchmark every available backend and the naive reference; print a table.

    Args:
        json_path: where to write the report as JSON (None: don't).
        sizes: numbers of points per call.
        repeats: timed calls per measurement (after one warm-up); the median is reported.
        cfg: grid to benchmark; default L=16, F=2, T=2^19.
        reference_repeats: timed calls for the slow naive reference.
        active_levels: also time torch and triton with only this many levels computed.
    Returns:
        The report: devices, torch version, threads, config, results, speedups, accuracy,
        skipped backends.
    """
    cfg = cfg or HashGridConfig(n_levels=16, n_features_per_level=2, log2_hashmap_size=19)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows, accuracy, skipped = [], [], []
    for device in devices:
        r, a = bench_device(cfg, device, sizes, repeats, reference_repeats, active_levels)
        rows += r
        accuracy += a
        skipped += [{"device": device.type, "backend": name, "reason": reason}
                    for name, reason in skipped_backends(device).items()]
    report = {
        "benchmark": "hashgrid",
        "devices": {d.type: device_name(d) for d in devices},
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(cfg),
        "sizes": list(sizes),
        "results": rows,
        "speedup": _speedups(rows),
        "accuracy": accuracy,
        "skipped": skipped,
    }
    print(format_table(report))
    if json_path:
        write_json(json_path, report)
    return report

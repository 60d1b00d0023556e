"""gpu-check parts 1 and 2, the kernels: the hash grid (Triton and tiny-cuda-nn vs torch) and
attention (xformers vs PyTorch SDPA, per call and on a whole UNet). Each ``part_*(smoke, deadline)``
returns ``{"status", "summary", "numbers"}``; ``rf_bench.gpu_check`` runs them."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable

import torch

from rf_bench.common import fmt, part_device

__all__ = ["part_attention", "part_hashgrid"]


def _xformers_reason(device: torch.device) -> str | None:
    """None when xformers runs on ``device``, else the ``skipped: ...`` status."""
    from rf_bench.prior import xformers_skip_reason
    from rf_core.prior.attention import xformers_usable

    if xformers_usable(str(device)):
        return None
    if importlib.util.find_spec("xformers") is None or device.type == "cuda":
        return xformers_skip_reason()
    return "skipped: xformers runs only on CUDA (cpu smoke)"


# ---------------------------------------------------------------------------- 1. hash grid
@contextlib.contextmanager
def _triton_interpreter(on: bool):
    """TRITON_INTERPRET=1 inside (the backend builds one kernel per mode), restored after."""
    before = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        elif on:
            os.environ["TRITON_INTERPRET"] = before


def _parity(fast, ref, x, params, upstream) -> dict:
    res = []
    for encode in (ref, fast):
        out = encode(x, params)
        res.append((out.detach().float(), torch.autograd.grad(out, params, upstream)[0].float()))
    (o_t, g_t), (o_c, g_c) = res
    return {"n_points": x.shape[0], "max_abs_value_diff": (o_c - o_t).abs().max().item(),
            "max_abs_grad_diff": (g_c - g_t).abs().max().item(),
            "grad_rel_l2_diff": ((g_c - g_t).norm() / g_t.norm().clamp_min(1e-30)).item(),
            "max_abs_value": o_t.abs().max().item(), "max_abs_grad": g_t.abs().max().item()}


def part_hashgrid(smoke: bool, deadline: float) -> dict:
    """Triton and tcnn vs torch: parity and speed (all levels, and half of them active),
    through ``rf_bench.hashgrid``'s measurement. The CPU smoke run takes Triton through its
    interpreter (parity only: interpreted speed means nothing)."""
    from rf_bench.hashgrid import bench_device, encoders, skipped_backends
    from rf_core.scene.encoding import HashGridConfig
    from rf_core.scene.encoding.backends import triton_import_error
    from rf_core.scene.encoding.layout import grid_layout

    device = part_device(smoke)
    if smoke:
        cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=12)
        sizes, repeats, reference_repeats = (2**10,), 1, 1
    else:
        cfg = HashGridConfig(n_levels=16, n_features_per_level=2, log2_hashmap_size=19)
        sizes, repeats, reference_repeats = (2**16, 2**18), 5, 2
    interpret = device.type == "cpu" and triton_import_error() is None
    with _triton_interpreter(interpret):
        rows, accuracy = bench_device(cfg, device, sizes, repeats, reference_repeats,
                                      active_levels=cfg.n_levels // 2)
        skipped = skipped_backends(device)
        numbers: dict = {"device": device.type, "config": {
                         "n_levels": cfg.n_levels, "n_features_per_level": cfg.n_features_per_level,
                         "log2_hashmap_size": cfg.log2_hashmap_size},
                         "sizes": list(sizes), "active_levels_timed": cfg.n_levels // 2,
                         "results": rows, "accuracy_vs_reference": accuracy,
                         "triton_interpreted": interpret, "skipped": skipped,
                         "triton_vs_torch": None, "tcnn_vs_torch": None}
        by_name = encoders(cfg, device)
        layout = grid_layout(cfg)
        n = sizes[-1]
        gen = torch.Generator().manual_seed(1)
        # fp16-representable parameters: only tcnn's half-precision arithmetic differs.
        params = (torch.rand(layout.n_params, generator=gen) * 2 - 1).half().float() \
            .to(device).requires_grad_()
        x = torch.rand(n, 3, generator=gen).to(device)
        upstream = (torch.rand(n, layout.n_levels * layout.n_features, generator=gen) * 2 - 1
                    ).to(device)
        for name in ("triton", "tcnn"):
            if name in by_name:
                numbers[f"{name}_vs_torch"] = _parity(by_name[name], by_name["torch"], x,
                                                      params, upstream)
    fused = [name for name in ("triton", "tcnn") if name in by_name]
    if fused:
        status = "ok"
    else:
        status = "skipped: no fused hash grid (" + "; ".join(
            f"{name}: {why}" for name, why in skipped.items()) + ")"
    big = {r["backend"]: r for r in rows if r["n_points"] == sizes[-1]}
    speed = ", ".join(f"{b} {fmt(r['forward_points_per_s'] / 1e6)}/"
                      f"{fmt(r['forward_backward_points_per_s'] / 1e6)}"
                      + (" (interpreted)" if r.get("interpreted") else "")
                      for b, r in big.items())
    summary = f"{sizes[-1]} pts, Mpt/s fwd/fwd+bwd: {speed}"
    for name in reversed(fused):
        p = numbers[f"{name}_vs_torch"]
        summary = (f"{name} vs torch: max |value diff| {p['max_abs_value_diff']:.2e}, max "
                   f"|grad diff| {p['max_abs_grad_diff']:.2e} (rel L2 "
                   f"{p['grad_rel_l2_diff']:.1e}); " + summary)
    if skipped:
        summary += "; skipped: " + ", ".join(skipped)
    return {"status": status, "summary": summary, "numbers": numbers}


# ---------------------------------------------------------------------------- 2. attention
def _attention_cases(smoke: bool) -> list[tuple[str, int, int, int, int, int]]:
    """(label, batch, query tokens, key tokens, heads, head dim). SD 1.5 at 512 px: its largest
    attention is at 64x64 latents, 320 channels = 8 heads x 40; classifier-free guidance makes
    one SDS image a batch of 2, SDS batch 8 a batch of 16."""
    if smoke:
        return [("self 8x8 b2", 2, 64, 64, 2, 8), ("cross 8x8x7 b2", 2, 64, 7, 2, 8)]
    return [("self 64x64 b2", 2, 4096, 4096, 8, 40), ("cross 64x64x77 b2", 2, 4096, 77, 8, 40),
            ("self 64x64 b16", 16, 4096, 4096, 8, 40)]


def _attention_call(device: torch.device, dtype: torch.dtype, case, xformers: bool,
                    repeats: int, warmup: int) -> dict:
    import torch.nn.functional as F

    from rf_bench.common import median_time

    label, b, m, n, h, k = case
    gen = torch.Generator().manual_seed(0)
    # Inputs in xformers' [B, M, H, K]; SDPA gets the [B, H, M, K] views diffusers gives it.
    q, key, v = (torch.randn(b, t, h, k, generator=gen).to(device, dtype) for t in (m, n, n))
    grad_out = torch.randn(b, m, h, k, generator=gen).to(device, dtype)
    impls: dict[str, Callable] = {"sdpa": lambda q, k_, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k_.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)}
    if xformers:
        import xformers.ops

        impls["xformers"] = xformers.ops.memory_efficient_attention
    row: dict = {"case": label, "shape_bmhk": [b, m, h, k], "key_tokens": n,
                 "dtype": str(dtype).removeprefix("torch.")}
    ref = None
    if b * h * m * n * 4 <= 2**32:  # fp32 reference with its attention matrix: <= 4 GiB
        leaves = [t.detach().float().requires_grad_() for t in (q, key, v)]
        ql, kl, vl = (t.transpose(1, 2) for t in leaves)
        att = ((ql @ kl.transpose(-1, -2)) * k ** -0.5).softmax(-1)
        out = (att @ vl).transpose(1, 2)
        ref = (out.detach(), torch.autograd.grad(out, leaves, grad_out.float()))
        del att, out, leaves
    results = {}
    for name, fn in impls.items():
        leaves = [t.detach().requires_grad_() for t in (q, key, v)]

        def forward(fn=fn):
            with torch.no_grad():
                return fn(q, key, v)

        def forward_backward(fn=fn, leaves=leaves):
            out = fn(*leaves)
            return out.detach(), torch.autograd.grad(out, leaves, grad_out)

        t_f, _ = median_time(forward, device, repeats, warmup)
        t_fb, results[name] = median_time(forward_backward, device, repeats, warmup)
        entry = {"forward_ms": t_f * 1e3, "forward_backward_ms": t_fb * 1e3,
                 "forward_calls_per_s": 1 / t_f, "forward_backward_calls_per_s": 1 / t_fb}
        if ref is not None:
            out, grads = results[name]
            entry["max_abs_out_diff_vs_fp32"] = (out.float() - ref[0]).abs().max().item()
            entry["max_abs_grad_diff_vs_fp32"] = max(
                (g.float() - r).abs().max().item() for g, r in zip(grads, ref[1]))
        row[name] = entry
    if "xformers" in results:
        (o_s, g_s), (o_x, g_x) = results["sdpa"], results["xformers"]
        row["xformers_vs_sdpa"] = {
            "max_abs_out_diff": (o_x.float() - o_s.float()).abs().max().item(),
            "max_abs_grad_diff": max((a.float() - b_.float()).abs().max().item()
                                     for a, b_ in zip(g_x, g_s))}
    return row


def _set_attention(sd, backend: str) -> None:
    if backend == "math":  # diffusers' plain processor: the smoke run's second backend
        from diffusers.models.attention_processor import AttnProcessor

        sd.unet.set_attn_processor(AttnProcessor())
    else:
        from rf_core.prior.attention import configure_models

        configure_models(sd.unet, sd.vae, backend=backend)


def _unet_parity(sd, backends: tuple[str, str], repeats: int, warmup: int) -> dict:
    """The UNet's output for one input under two attention backends: difference and speed."""
    from rf_bench.common import median_time

    unet, device, dtype = sd.unet, sd.device, sd.dtype
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    side = cfg.sample_size
    latents = torch.randn(2, cfg.in_channels, side, side, generator=gen).to(device, dtype)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    outs, out = {}, {"backends": list(backends), "latent_shape": list(latents.shape)}
    for backend in backends:
        _set_attention(sd, backend)

        def forward():
            with torch.no_grad():
                return unet(latents, t, encoder_hidden_states=text).sample

        seconds, outs[backend] = median_time(forward, device, repeats, warmup)
        out[f"{backend}_forward_ms"] = seconds * 1e3
    a, b = (outs[x].float() for x in backends)
    diff = (b - a).abs().max().item()
    out.update(max_abs_diff=diff, max_abs_output=a.abs().max().item(),
               rel_diff=diff / max(a.abs().max().item(), 1e-30),
               finite=bool(torch.isfinite(a).all() and torch.isfinite(b).all()))
    _set_attention(sd, "sdpa")
    return out


def part_attention(smoke: bool, deadline: float) -> dict:
    """xformers vs SDPA: SD-1.5-sized attention calls, then the SD-1.5-size UNet output."""
    device = part_device(smoke)
    dtype = torch.float32 if smoke else torch.float16
    reason = _xformers_reason(device)
    xformers = reason is None
    repeats, warmup = (2, 1) if smoke else (20, 3)
    calls = [_attention_call(device, dtype, case, xformers, repeats, warmup)
             for case in _attention_cases(smoke)]
    numbers: dict = {"device": device.type, "calls": calls, "unet": None}
    if smoke:  # tiny UNet, SDPA vs diffusers' plain processor: the same code path
        from rf_core.prior.loading import ModelConfig, load_components

        sd = load_components(ModelConfig(name="tiny", device="cpu", dtype="fp32",
                                         attention="sdpa"))
        numbers["unet"] = {"model": "tiny", **_unet_parity(sd, ("sdpa", "math"), 1, 0)}
    elif xformers and deadline - time.monotonic() > 30:
        from rf_core.prior.random_models import sd15_sized_components

        sd = sd15_sized_components(device, torch.float16, "sdpa")
        numbers["unet"] = {"model": "sd15-size", **_unet_parity(sd, ("sdpa", "xformers"), 5, 2)}
        del sd
    elif xformers:
        numbers["unet"] = "skipped: not enough of the part's time left"
    first = calls[0]
    summary = f"{first['case']}: sdpa {first['sdpa']['forward_backward_ms']:.2f} ms fwd+bwd"
    if "xformers" in first:
        summary += (f", xformers {first['xformers']['forward_backward_ms']:.2f} ms; xformers vs "
                    f"sdpa max |out diff| {first['xformers_vs_sdpa']['max_abs_out_diff']:.1e}")
    if "sdpa" in first and "max_abs_out_diff_vs_fp32" in first["sdpa"]:
        summary += f"; sdpa vs fp32 {first['sdpa']['max_abs_out_diff_vs_fp32']:.1e}"
    unet = numbers["unet"]
    if isinstance(unet, dict):
        summary += (f"; UNet ({unet['model']}) {unet['backends'][1]} vs {unet['backends'][0]} "
                    f"rel diff {unet['rel_diff']:.1e}")
    return {"status": reason or "ok", "summary": summary, "numbers": numbers}

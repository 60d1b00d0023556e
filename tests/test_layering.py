"""The layering rules of docs/ARCHITECTURE: who may import what, and how big a module may grow.

- rf_core never imports ray or mlflow (checked in a fresh interpreter, imports included);
- no module imports another module's ``_private`` name;
- no import cycles between modules (imports inside functions count: they are cycles too,
  only deferred);
- no library module is over 500 lines;
- YAML is read and written only by ``rf_core.config``;
- every package ``__init__`` lists its public names in ``__all__``, and they all exist;
- rf_core's subpackages follow the path the data takes (``STAGES``): a module imports only from
  its own stage or an earlier one.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rf_core", "rf_distributed", "rf_cli", "rf_bench")
LIBRARY = ("rf_core", "rf_distributed", "rf_cli")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    package = module.split(".")
    if MODULES[module].name != "__init__.py":
        package = package[:-1]
    package = package[:len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def _imports(module: str):
    """(imported module, imported name or None) for every import in ``module``."""
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            target = _target(module, node)
            for alias in node.names:
                yield target, alias.name


def _ours(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in PACKAGES


def test_rf_core_imports_neither_ray_nor_mlflow():
    code = ("import sys, pkgutil, importlib, rf_core\n"
            "for m in pkgutil.walk_packages(rf_core.__path__, 'rf_core.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_rf_core_source_names_neither_ray_nor_mlflow():
    bad = [f"{m} imports {t}" for m in MODULES if m.startswith("rf_core")
           for t, _ in _imports(m) if t and t.split(".")[0] in ("ray", "mlflow")]
    assert not bad, bad


def test_no_private_names_cross_modules():
    crossings = []
    for module in MODULES:
        for target, name in _imports(module):
            if not _ours(target) or target == module:
                continue
            private = [p for p in ([name] if name else []) + target.split(".")
                       if p.startswith("_") and not p.startswith("__")]
            if private:
                crossings.append(f"{module} imports {target}.{name or ''}")
    assert not crossings, "\n".join(crossings)


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, name in _imports(module):
            if not _ours(target):
                continue
            full = f"{target}.{name}" if name else target
            hit = full if full in MODULES else target if target in MODULES else None
            # a package's __init__ re-exporting its modules is not a cycle of the modules
            if hit and hit != module and MODULES[hit].name != "__init__.py" \
                    and MODULES[module].name != "__init__.py":
                edges[module].add(hit)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert not _cycles(_edges())


STAGES = ("rf_core", "rf_core.files", "rf_core.input", "rf_core.scene", "rf_core.ground_truth",
          "rf_core.prior", "rf_core.fitting", "rf_core.output", "rf_core.evaluation",
          "rf_core.jobs")
"""rf_core along the path of the data: the shared base (config, errors, progress, devices, host
syncs), files that never lose a user's work, the photo in, the 3D scene, ground-truth scenes and
their metrics, the diffusion priors, fitting, exports, evaluation, and the jobs that fill run
folders."""


def _stage(module: str) -> int:
    return max(i for i, s in enumerate(STAGES) if module == s or module.startswith(s + "."))


def test_every_rf_core_module_has_a_stage():
    top = sorted(m for m, p in MODULES.items() if m.startswith("rf_core.")
                 and m.count(".") == 1 and p.name != "__init__.py")
    assert top == ["rf_core.config", "rf_core.config_doc", "rf_core.errors", "rf_core.host_sync",
                   "rf_core.precision", "rf_core.progress"], top
    packages = sorted(m for m, p in MODULES.items() if m.startswith("rf_core.")
                      and m.count(".") == 1 and p.name == "__init__.py")
    assert packages == sorted(STAGES[1:]), packages


def test_rf_core_imports_follow_the_data_path():
    edges = _edges()
    backwards = [f"{m} ({STAGES[_stage(m)]}) imports {t} ({STAGES[_stage(t)]})"
                 for m in edges if m.startswith("rf_core.") and MODULES[m].name != "__init__.py"
                 for t in edges[m] if t.startswith("rf_core") and _stage(t) > _stage(m)]
    assert not backwards, "\n".join(sorted(backwards))


def test_library_modules_are_small():
    big = {m: n for m, p in MODULES.items() if m.startswith(LIBRARY)
           and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these by concept (<= {MAX_LINES} lines): {big}"


def test_only_the_config_module_touches_yaml():
    users = sorted({m for m in MODULES for t, _ in _imports(m) if t == "yaml"})
    assert users == ["rf_core.config"], users


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items()
                                           if p.name == "__init__.py"))
def test_packages_declare_their_public_names(package):
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert isinstance(names, list | tuple) and names, f"{package} has no __all__"
    missing = [n for n in names if not hasattr(module, n)
               and importlib.util.find_spec(f"{package}.{n}") is None]
    assert not missing, f"{package}.__all__ names what it lacks: {missing}"


BARE_GPU_MACHINE_LACKS = ("ray", "mlflow", "pybullet", "pybullet_data", "trimesh",
                          "imageio_ffmpeg", "viser", "xatlas")
"""Packages of ours that the bare GPU machine of the gpu-check has not (it has torch, triton,
transformers, accelerate, safetensors, huggingface_hub, numpy, Pillow, scipy, pyyaml, tqdm,
imageio, scikit-image; diffusers travels as a wheel)."""


def test_a_step_inversion_and_sds_run_without_ray_mlflow_pybullet_trimesh():
    """What the gpu-check runs on the bare GPU machine: imports, a tiny ``Reconstructor`` step,
    an inversion step and an SDS call, with those packages made unimportable."""
    code = f"""
import sys
for name in {BARE_GPU_MACHINE_LACKS!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import torch
import rf_bench.gpu_check, rf_bench.gpu_kernels, rf_bench.gpu_pipeline, rf_bench.prior
import rf_core.fitting.reconstruct, rf_core.prior, rf_core.jobs.reconstruct_job
import rf_distributed.placement
from rf_bench.gpu_pipeline import SMOKE_RECON
from rf_bench.prior import synthetic_photo
from rf_core.prior import ModelConfig, StableDiffusionPrior
from rf_core.prior.conditioning import PromptConfig, make_conditioning
from rf_core.prior.inversion import InversionConfig, invert
from rf_core.fitting.reconstruct import Reconstructor
from rf_core.jobs.job_config import load_job_config
from rf_core.progress import quiet

cfg = load_job_config("realfusion", overrides=["model.name=tiny", "model.device=cpu",
                                               *SMOKE_RECON])
prior = StableDiffusionPrior(cfg.model)
rgb, mask = synthetic_photo(cfg.recon.input_size)
with quiet():
    result = invert(prior, rgb, mask, InversionConfig(steps=1, grad_accum=1, initializer="cat",
                                                      checkpoint_every=0))
assert result.losses and all(l == l for l in result.losses)
cond = make_conditioning(PromptConfig(token="<e>"), azimuth=torch.tensor([30.0]),
                         elevation=torch.tensor([15.0]))
grad = prior.sds_grad(torch.rand(1, 3, 16, 16), cond, step=0,
                      generator=torch.Generator().manual_seed(0))
assert grad.shape == (1, 3, 16, 16) and torch.isfinite(grad).all()
metrics = Reconstructor(cfg.recon, rgb, mask, prior, device="cpu").step()
assert all(v == v for k, v in metrics.items() if k.startswith("loss/")), metrics
absent = [n for n in {BARE_GPU_MACHINE_LACKS!r} if sys.modules.get(n) is not None]
assert not absent, absent
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

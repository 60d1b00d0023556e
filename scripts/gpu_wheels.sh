#!/usr/bin/env bash
# Download the wheels the gpu-check needs on a bare GPU machine into .whl/ (git-ignored).
#
# That machine has its own torch (CUDA), triton, transformers, accelerate, safetensors,
# huggingface_hub, numpy, Pillow, scipy, pyyaml, tqdm, imageio, scikit-image, psutil and
# pytest, and no package index. A Reconstructor step, textual inversion and SDS need only
# diffusers beside those (Ray, MLflow, pybullet and trimesh are imported only where used,
# and no gpu-check part uses them). diffusers' own needs are all there too, except
# importlib_metadata, which it names but does not import on Python >= 3.8: it travels anyway
# (27 kB) so that pip sees it satisfied.
#
# Wheels for CPython 3.12, manylinux x86_64 (the machine's python3), whatever this machine is.
# Usage: bash scripts/gpu_wheels.sh [DEST]   (default .whl; about 6.4 MB in all)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# diffusers: the version this repository is tested with (pyproject: >=0.42,<0.50)
WHEELS=(${GPU_WHEELS:-diffusers==0.42.1 importlib_metadata==9.1.0})
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1

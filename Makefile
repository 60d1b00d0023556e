# Two commands on a fresh machine:  `make sweep` (main job)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RF := $(VENV)/bin/rf
# CPU machines take the local CPU wheel of this exact release; GPU users may set TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run demo sweep example-objects dataset compare ui ui-screenshots mlflow-server test lint bench-hashgrid bench-multiview bench-singleview bench-sharing bench-prior bench-dataset gpu-check invert-example prior-train clean test-fast

install: $(VENV)/.installed

# pip takes torch (the local CPU wheel, or TORCH_SPEC); uv installs the rest, resolving the same
# versions as pip in 27 s instead of 65 s on 2 cores. It keeps the torch already installed.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" uv
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -e ".[dev]"
	touch $@

# Main job: the default sweep (alias).
run: sweep

# One photo -> 360° video + mesh on the CPU with the project's own novel-view prior (offline).
demo: install
	$(RF) reconstruct examples/duck.png --preset learned --out outputs/demo --overwrite

# Ray Tune sweep (local Ray, local MLflow store in outputs/mlflow); rerunning continues it.
# The default sweeps two pybullet objects with ground truth (rendered on first use).
SWEEP ?= tune_configs/default.yaml
sweep: install
	$(RF) sweep $(SWEEP) --resume

# Dataset-scale reconstruction: every object of a folder or manifest, exactly once, resumable.
# Default: three pybullet objects rendered with ground truth (made on first use), learned prior.
DATASET ?= outputs/example_dataset/manifest.jsonl
DATASET_OUT ?= outputs/datasets/example
dataset: install example-objects
	$(RF) dataset $(DATASET) --out $(DATASET_OUT) --preset learned

# Three pybullet objects (duck, soccer ball, torus) rendered with ground truth: 9 views, 128 px.
example-objects: install
	@test -e outputs/example_dataset/manifest.jsonl || $(PY) -c "from rf_core.ground_truth.example_objects \
	  import make_objects; make_objects(__import__('pathlib').Path('outputs/example_dataset'), \
	  3, size=128, views=9)"

# Compare every finished trial and object in the MLflow store: table, CSV, Markdown, plots.
COMPARE_ARGS ?=
compare: install
	$(RF) compare $(COMPARE_ARGS)

MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
# The MLflow UI on the project's store (sweeps, datasets, comparisons): http://127.0.0.1:5000
ui: install
	mkdir -p outputs/mlflow/artifacts
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow/mlflow.db \
	  --default-artifact-root $(CURDIR)/outputs/mlflow/artifacts \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

# What a user sees of the last `make sweep` in MLflow, as PNGs from headless Chromium
# (Debian's chromium): runs table (saved view), sweep run, best trial, its artifacts, compare.
UI_EXPERIMENT ?= default
ui-screenshots: install
	$(PY) -m rf_bench.mlflow_ui --tracking-uri sqlite:///$(CURDIR)/outputs/mlflow/mlflow.db \
	  --artifacts $(CURDIR)/outputs/mlflow/artifacts --experiment $(UI_EXPERIMENT) \
	  --workflow-type machine_learning --out outputs/mlflow_ui

# A real MLflow tracking server on loopback for multi-node sweeps:
#   rf sweep CONFIG.yaml --address HEAD:6379 --tracking-uri http://HEAD_IP:5000
mlflow-server: install
	mkdir -p outputs/mlflow
	$(VENV)/bin/mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow/mlflow.db \
	  --artifacts-destination $(CURDIR)/outputs/mlflow/artifacts --serve-artifacts

# One pytest worker per core (pytest-xdist); a file's tests stay on one worker and the slow
# full-size tests run one at a time (tests/conftest.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

test: install lint
	$(PY) -m pytest -q $(XDIST)

# The inner loop (2 min 38 s on a fast 2-core host, 5 min 47 s on an AVX2-only EPYC): what
# `make test` runs but the Ray tests, the slow full-size runs and the fault suite's
# kill-and-resume subprocesses. `make test` before pushing.
test-fast: install lint
	$(PY) -m pytest -q $(XDIST) -m "not slow and not ray" --ignore=tests/test_faults.py

lint: install
	$(VENV)/bin/ruff check .

bench-hashgrid: install
	$(RF) bench hashgrid --json outputs/bench_hashgrid.json

bench-singleview: install
	$(RF) bench singleview pybullet_data:duck.obj --json outputs/singleview_duck.json

bench-sharing: install
	$(RF) bench prior-sharing --trials 4 --json outputs/bench_prior_sharing.json

bench-dataset: install
	$(RF) bench dataset --objects 6 --nodes 3 --json outputs/bench_dataset.json

bench-prior: install
	$(RF) bench prior --json outputs/bench_prior.json

# Every GPU test and benchmark in one run (<= 9 minutes on one H100/H200; needs CUDA): report
# in outputs/gpu_check/ (gpu_check.json, .md, .log). Needs no install: on a bare GPU machine
# (its own torch, no package index) bring .whl/ from `bash scripts/gpu_wheels.sh` and run
# `make gpu-check` (or `bash scripts/gpu_check.sh`) there; it uses .venv's python if present.
GPU_CHECK_OUT ?= outputs/gpu_check
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) GPU_CHECK_OUT=$(GPU_CHECK_OUT) \
	  bash scripts/gpu_check.sh

# Textual inversion of the authors' cat photo with the offline tiny model (random weights).
invert-example: install
	$(RF) invert ../shared/data/realfusion-examples/cat_statue/image.png \
	  --mask ../shared/data/realfusion-examples/cat_statue/mask.png \
	  --model tiny --out outputs/cat_statue.safetensors inversion.initializer=cat inversion.steps=300

# The learned novel-view prior: renders its training pairs on first use (outputs/
# novel_view_data/<size>px, ~4 min on one core), then trains (1,600 steps of the 32 px regressor
# by default); rerunning continues the run. E.g. PRIOR_ARGS="--kind diffusion --steps 3000
# ema_decay=0.999 --threads 2" or "--max-minutes 15 --threads 2".
PRIOR_OUT ?= outputs/novel_view_prior
PRIOR_ARGS ?= --threads 2
prior-train: install
	$(RF) prior train --out $(PRIOR_OUT) $(PRIOR_ARGS)

bench-multiview: install
	for m in duck.obj soccerball.obj torus/torus_textured.obj; do \
	  n=$$(basename $$m .obj); \
	  $(RF) bench multiview pybullet_data:$$m --json outputs/multiview_$$n.json --out outputs/multiview_$$n || exit 1; \
	done

clean:
	rm -rf outputs .pytest_cache .ruff_cache

"""Shared test set-up: built tiny diffusion models go to a per-session cache folder, never to
the user's ``~/.cache``; subprocesses (CLI tests) inherit it through the environment."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_MADE: list[str] = []
"""Temporary folders this process made for the session, removed at its end (the built
full-size models alone take about 9 GB)."""


def pytest_configure(config: pytest.Config) -> None:
    if "RF_CACHE" not in os.environ:  # xdist workers inherit the controller's
        os.environ["RF_CACHE"] = tempfile.mkdtemp(prefix="rf-test-cache-")
        _MADE.append(os.environ["RF_CACHE"])
    os.environ["HF_HUB_OFFLINE"] = "1"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # `make test` runs one worker per core: a worker (and the commands it starts) takes
        # one thread, not one per core each
        os.environ["OMP_NUM_THREADS"] = "1"
        # ray.init() without an address joins the cluster a `ray start` left in its temp
        # folder: each worker gets its own, so one worker's cluster is never the other's
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"ray-{worker}-", dir="/tmp")
        _MADE.append(os.environ["RAY_TMPDIR"])


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_prior():
    """A fresh tiny epsilon-prediction prior per test module (tests may register tokens)."""
    from rf_core.prior import ModelConfig, StableDiffusionPrior

    return StableDiffusionPrior(ModelConfig(name="tiny", device="cpu"))


@pytest.fixture(scope="module")
def tiny_v_prior():
    """A fresh tiny v-prediction prior (SD 2.x style) per test module."""
    from rf_core.prior import ModelConfig, StableDiffusionPrior

    return StableDiffusionPrior(ModelConfig(name="tiny-v", device="cpu"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for every test that needs a real cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


FIRST = ("slow", "tests/test_faults.py", "tests/rf_distributed/test_dataset.py",
         "tests/rf_distributed/test_sweep_objects.py", "tests/rf_distributed/test_sweep.py")
"""The longest groups, started first so that the other worker fills in around them (measured:
the slow group is about 7 min on one thread, the fault suite 5). Only the order changes."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that starts or joins a Ray cluster carries the ``ray`` marker, so
    ``pytest -m "not ray"`` runs the rest apart (in about a third of the time).

    Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup --no-loadscope-reorder``) a
    file's tests stay on one worker, so module fixtures (built models, reference runs) are made
    once, and the ``slow`` tests (full-size models, up to 16 GB each) form one group that runs
    on one worker, one after another: two of them at once would not fit in 24 GB. The longest
    groups (``FIRST``) start first."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(FIRST)))  # stable: files keep order


def _group(item: pytest.Item) -> str:
    return "slow" if item.get_closest_marker("slow") else item.nodeid.split("::")[0]


ONE_THREAD = ("test_multinode_cluster_loses_a_node",)
"""Slow tests that start several Ray nodes (a process each): two threads apiece oversubscribe."""


@pytest.fixture(autouse=True)
def _two_threads_for_slow_tests(request, monkeypatch):
    """A slow test (a full-size model) may use both cores: under xdist the other worker is often
    idle by then, and 1 thread makes the paper-config run 1.7x slower (174 s vs 102 s)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and request.node.get_closest_marker("slow") \
            and request.node.name not in ONE_THREAD:
        import torch

        threads = torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        yield
        torch.set_num_threads(threads)
    else:
        yield

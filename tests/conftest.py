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


def pytest_terminal_summary(terminalreporter) -> None:
    """The host in one line at the end of every run (``-q`` hides pytest's header), so that a
    run's time can be read: the same commit took 9 min on the faster 2-core hosts and 24 on a
    2-core AVX2-only AMD EPYC (README)."""
    terminalreporter.write_line(host_line())


def host_line() -> str:
    """CPU model, cores, native bf16, and a yardstick: a fixed one-thread workload (Python and
    a matrix product), best of three, for comparing test times across hosts."""
    import time

    import torch

    from rf_bench.common import cpu_name
    from rf_core.precision import cpu_has_native_bf16

    bf16 = ("native bf16" if cpu_has_native_bf16()
            else "no native bf16: the full-size tests run in fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.ones(384, 384)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sum(i * i for i in range(200_000))
        for _ in range(10):
            a @ a
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(threads)
    return (f"host: {cpu_name()}, {os.cpu_count()} cores, {bf16}; "
            f"yardstick {best * 1e3:.0f} ms (one thread, best of 3)")


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


FULL_SIZE_GROUP = "full-size"
"""The xdist group of the ``full_size`` tests: one worker runs them one after another."""

FIRST = (FULL_SIZE_GROUP, "tests/test_faults.py", "tests/rf_distributed/test_dataset.py",
         "tests/rf_bench/test_gpu_check.py", "tests/rf_distributed/test_sweep_objects.py",
         "tests/rf_distributed/test_sweep.py")
"""The longest groups, started first so that the other worker fills in around them (measured
beside the other worker: the full-size group about 4.5 min, the fault suite about 2.5, the
dataset tests about 2). Only the order changes. The full-size tests keep the worker's one
thread: both cores are busy for the whole run, and two threads took more CPU time in all (a
second thread waits on a core the other worker holds) without shortening the run."""


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that starts or joins a Ray cluster carries the ``ray`` marker, so
    ``pytest -m "not ray"`` runs the rest apart (in about a third of the time).

    Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup --no-loadscope-reorder``) a
    file's tests stay on one worker, so module fixtures (built models, reference runs) are made
    once, and the ``full_size`` tests (SD-1.5-sized models, up to 16 GB each) form one group
    that runs on one worker, one after another: two of them at once would not fit in 24 GB.
    The longest groups (``FIRST``) start first."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(FIRST)))  # stable: files keep order


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist runs too
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Under ``--dist loadgroup`` each collected id carries its group as an ``@group`` suffix
    (xdist's worker hook adds it). pytest 9.2 made node ids read-only to that hook: the groups
    were silently dropped and every test was scheduled on its own, so module fixtures were
    built once per worker and two ``slow`` tests could run at once. Stop instead."""
    if node.config.getvalue("dist") == "loadgroup" and ids and not all("@" in i for i in ids):
        pytest.exit(f"pytest-xdist did not group the tests under pytest {pytest.__version__}; "
                    "install the dev pins (pip install -e .[dev]) or run with TEST_WORKERS=0",
                    returncode=4)


def _group(item: pytest.Item) -> str:
    if item.get_closest_marker("full_size"):
        return FULL_SIZE_GROUP
    return item.nodeid.split("::")[0]

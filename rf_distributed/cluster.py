"""The Ray cluster: joining it with one clear error, and checking that work can ever fit.

Used by ``rf sweep`` and ``rf dataset`` alike.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import ray

__all__ = ["ClusterError", "autoscaling", "check_reachable", "check_trial_fits", "connect"]


class ClusterError(ConnectionError):
    """The Ray cluster cannot be reached, or cannot ever run a trial of this sweep."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP check of ``host:port`` (ray.init itself retries for minutes on a dead address)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} must look like HOST:PORT (e.g. "
                           "10.0.0.1:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()  # reachable
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); "
                           "start it with `ray start --head` there, or leave out --address "
                           "for a local one") from err


_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _without_auth_notice() -> Iterator[None]:
    """Ray (2.5x on) logs a warning on each local start that token authentication is on, its
    default. rf's commands print one line per error, so that notice is held back here; the
    authentication itself is Ray's, unchanged (``RAY_AUTH_MODE`` still chooses it)."""
    log = logging.getLogger(_AUTH_NOTICE_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local one); one clear error if unreachable."""
    if ray.is_initialized():
        return
    if address and address != "auto":
        check_reachable(address)
    try:
        with _without_auth_notice():
            ray.init(address=address, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({err}); start it with "
                           "`ray start --head` or leave out --address for a local one") from err


def autoscaling() -> bool:
    # Tune's own test (ray.tune.execution.cluster_info): the cluster launcher leaves this file
    # on the head node. Such a cluster may grow into a request it cannot run today.
    return Path("~/ray_bootstrap_config.yaml").expanduser().exists()


_RAY_NAMES = {"cpu": "CPU", "gpu": "GPU"}  # Tune's resource dict -> Ray's resource names


def check_trial_fits(resources: dict[str, float], nodes: list[dict]) -> None:
    """Raise :class:`ClusterError` unless one alive node of ``nodes`` (``ray.nodes()``) has at
    least ``resources`` (:func:`trial_resources`) in total: a trial's resources form one
    placement-group bundle, so they must all fit on one node, or the trial stays PENDING."""
    request = {_RAY_NAMES.get(k, k): float(v) for k, v in resources.items() if v}
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    fix = ("pass --gpus-per-trial 0, lower resources: in the sweep file, or use a bigger "
           "cluster (--address)")
    for name, amount in request.items():
        most = max((r.get(name, 0.0) for r in alive), default=0.0)
        if amount > most:
            total = sum(r.get(name, 0.0) for r in alive)
            raise ClusterError(f"a trial asks for {amount:g} {name} but no Ray node has more "
                               f"than {most:g} ({total:g} in the cluster), so it would wait "
                               f"forever; {fix}")
    if not any(all(r.get(k, 0.0) >= v for k, v in request.items()) for r in alive):
        want = ", ".join(f"{v:g} {k}" for k, v in request.items())
        shapes = dict.fromkeys(", ".join(f"{r.get(k, 0.0):g} {k}" for k in request)
                               for r in alive)  # distinct node shapes, in order
        have = "; ".join(list(shapes)[:4]) + ("; ..." if len(shapes) > 4 else "")
        raise ClusterError(f"a trial asks for {want} on one node but no Ray node has all of "
                           f"it (nodes: {have}), so it would wait forever; {fix}")

"""The Ray session a sweep runs in: connect to a cluster or start Ray on 127.0.0.1."""
from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ["init_ray", "free_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: Mapping[str, float] | None = None,
    object_store_memory: int = 400 * 1024 * 1024,
    dashboard_port: int | None = None,
    log_to_driver: bool = True,
) -> None:
    """Connect to a cluster (``address="auto"`` / ``ray://...``) or start Ray in-process.

    A local start binds every port to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``)
    and keeps memory modest. It runs the dashboard (on 127.0.0.1) because Ray Train's
    placement-group cleaner asks the state API whether a trial's controller is still
    alive, and it exports ``RAY_API_SERVER_ADDRESS`` to every Ray process so that
    lookup finds *this* instance even when other Ray instances run on the machine.
    A watcher (``tuning.ray_reaper``) ends the processes of a Ray started here once this process is
    gone, even after a SIGKILL. ``num_gpus=None`` lets Ray count the GPUs. ``log_to_driver=False`` keeps the workers' logs
    (and Ray's start-up lines) off this console; they stay in the session's log folder.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=_level(log_to_driver))
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # The flag is read when ray is imported; a process that imported ray before setting it
    # would still bind to the outside address, so set the module constant as well.
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # a busy machine starts the dashboard's modules slowly: wait for them rather than fail the sweep
    os.environ.setdefault("RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "300")
    # ... and the dashboard itself: Ray gives it 60 s (read when ray is imported), which a loaded
    # 2-core machine overran by a second (ray.init failed while the dashboard came up)
    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ:
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S, 300)
    port = dashboard_port or free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by raylet and workers
    kwargs: dict[str, Any] = dict(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=log_to_driver,
        logging_level=_level(log_to_driver),
    )
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    if resources:
        kwargs["resources"] = dict(resources)
    ray.init(**kwargs)
    from tuning.ray_reaper import start_reaper

    start_reaper()  # a driver SIGKILL must not leave this Ray's processes behind


def _level(verbose: bool) -> int:
    import logging

    return logging.INFO if verbose else logging.WARNING

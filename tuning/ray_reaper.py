"""Ends the processes of a local Ray when the process that started it dies, however it dies.

``ray.init()`` on a machine with no cluster starts Ray's head (GCS, raylet, dashboard and its agents)
as children of the driver. A normal exit stops them; after a driver SIGKILL (or an OOM kill) Ray's
dashboard and runtime-env agents were measured to live on for about a minute, and a trial's workers
until they notice the raylet is gone. :func:`start_reaper` spawns a small watcher in its own session
(a Ctrl+C in the terminal does not reach it) that notes the driver's descendants every second and,
once the driver is gone (its end of a pipe closes: no polling of PIDs that could be reused), stops
every one of them still alive: SIGTERM, then SIGKILL after a grace period. A process is matched by
PID *and* start time, so nothing that merely reuses a PID is touched.

Only a Ray this project started is reaped: a sweep that joins a cluster (``--address``, a job
submitted with ``ray job submit``) starts no reaper.
"""
from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["start_reaper"]

GRACE_S = 5.0


def start_reaper() -> subprocess.Popen:
    """Spawn the watcher of this process's descendants (see the module docstring); once per process:
    it watches every descendant, so the Ray a later ``ray.init`` starts is covered too."""
    if _STARTED:
        return _STARTED[0]
    read_end, write_end = os.pipe()  # the write end stays here (not inheritable): EOF when we die
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tuning.ray_reaper import watch; watch(int(sys.argv[1]))",
             str(os.getpid())],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONPATH": _repo_path()},
        )
    finally:
        os.close(read_end)
    _KEEP.append(write_end)
    _STARTED.append(proc)
    return proc


_KEEP: list[int] = []  # the pipe's write end lives as long as this process
_STARTED: list[subprocess.Popen] = []


def _repo_path() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)


def watch(driver_pid: int, interval_s: float = 1.0) -> None:
    """Note ``driver_pid``'s descendants until stdin reaches EOF (the driver is gone), then end them."""
    import select

    import psutil

    if driver_pid <= 1 or os.getppid() != driver_pid:
        return  # only the process that spawned this watcher is watched: never init, never a stranger
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, float] = {}
    while True:
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():  # this watcher is one of them
                    seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass
        ready, _, _ = select.select([sys.stdin], [], [], interval_s)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    _end(seen)


def _end(seen: dict[int, float]) -> None:
    import psutil

    alive = []
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    for proc in alive:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass

"""tuning.ray_reaper: a local Ray's processes end when the driver that started it dies, even by SIGKILL
(issue 25: a driver kill left Ray's dashboard and runtime-env agents running for about a minute)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _gone(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes of ``procs`` still running (not zombies) after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _killed_driver(body: str, tmp_path: Path) -> tuple[list[psutil.Process], dict]:
    """Run ``body`` in a driver that prints one JSON line when ready; note its descendants, SIGKILL it."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        info = json.loads(driver.stdout.readline())
        time.sleep(1.5)  # the watcher notes the tree once a second
        kids = psutil.Process(driver.pid).children(recursive=True)
    finally:
        driver.kill()
        driver.wait()
    return kids, info


def test_watcher_ends_the_drivers_descendants_after_a_sigkill_and_nothing_else(tmp_path):
    stranger = subprocess.Popen(["sleep", "60"])  # not the driver's: must survive
    try:
        kids, info = _killed_driver("""
            import json, subprocess
            from tuning.ray_reaper import start_reaper
            child = subprocess.Popen(["sleep", "60"])
            grandchild = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
            watcher = start_reaper()
            assert start_reaper() is watcher  # one per process
            print(json.dumps({"watcher": watcher.pid}), flush=True)
            import time; time.sleep(60)
        """, tmp_path)
        assert len(kids) >= 4  # sleep, sh, its sleep, the watcher
        assert not _gone(kids, 15), "descendants outlived the driver"
        assert stranger.poll() is None
    finally:
        stranger.kill()


def test_watcher_refuses_a_process_that_did_not_start_it():
    """Pointed at a process that is not its parent (init here), it returns at once and ends nothing."""
    proc = subprocess.run([sys.executable, "-c", "from tuning.ray_reaper import watch; watch(1)"],
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0
    assert psutil.Process(os.getpid()).is_running()


@pytest.mark.slow
def test_local_ray_ends_with_its_sigkilled_driver(tmp_path):
    kids, info = _killed_driver("""
        import json, os
        from tuning.ray_session import init_ray
        init_ray(num_cpus=1, log_to_driver=False)
        import ray
        @ray.remote
        def pid():
            return os.getpid()
        print(json.dumps({"task": ray.get(pid.remote())}), flush=True)
        import time; time.sleep(120)
    """, tmp_path)
    names = {p.name() for p in kids if p.is_running()}
    assert "raylet" in names and "gcs_server" in names, names
    left = _gone(kids, 30)  # before: Ray's DashboardAgent and RuntimeEnvAgent lived on for ~60 s
    assert not left, [(p.pid, p.name()) for p in left]

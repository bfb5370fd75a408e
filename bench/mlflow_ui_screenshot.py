"""Open a sweep's MLflow record in the real MLflow UI (headless Chromium) and screenshot it.

Starts ``mlflow ui`` on 127.0.0.1 (a free port) over the SQLite store, loads the experiment's
runs table, its chart view and the best trial's and refit's metric pages in headless Chromium,
writes PNGs to ``--out`` (outside the repository by default) and checks the rendered pages:
the run names of the sweep (``t00 γ=…``, ``refit best=…``, ``target-eval best=…``) must
appear in the runs table, and the per-epoch metric names (``val/objective``, ``train/loss``)
on the chart view. Exit status 1 when a check fails::

    apt-get install -y chromium        # once
    python bench/mlflow_ui_screenshot.py --tracking-uri sqlite:///$PWD/runs/mlflow.db \\
        --experiment ssvp-quick --out /tmp/mlflow-ui

Look at the PNGs (any image viewer); keep them out of the repository.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium on PATH: apt-get install -y chromium")


def start_ui(uri: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"mlflow ui exited with {proc.returncode}")
            time.sleep(1)
    proc.terminate()
    sys.exit("mlflow ui did not come up in 120 s")


def browse(url: str, png: Path | None, budget_ms: int, size: str) -> str:
    """Render ``url``; write a screenshot to ``png`` (if given); the rendered DOM."""
    base = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={size}", f"--virtual-time-budget={budget_ms}"]
    if png is not None:
        subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180, check=False)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=False)
    return dom.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'runs' / 'mlflow.db'}")
    p.add_argument("--experiment", default="ssvp-quick")
    p.add_argument("--out", default="/tmp/mlflow-ui", help="folder for the PNGs (not in the repository)")
    p.add_argument("--budget-ms", type=int, default=20000, help="time the page gets to load its data")
    args = p.parse_args(argv)

    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"no experiment {args.experiment!r} in {args.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=200)
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    family = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in family if r.data.tags.get("role") == "trial"]
    others = [r for r in family if r.data.tags.get("role") in ("refit", "target_eval")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_ui(args.tracking_uri, port)
    failures = []
    try:
        root = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
        pages = {
            "runs_table": f"{root}/runs",
            "chart_view": f"{root}/runs?compareRunsMode=CHART",
            "parent_run": f"{root}/runs/{parent.info.run_id}",
        }
        best = parent.data.tags.get("best_run_id")
        if best:
            pages["best_trial_metrics"] = f"{root}/runs/{best}/model-metrics"
        for r in others:
            pages[f"{r.data.tags['role']}_run"] = f"{root}/runs/{r.info.run_id}"
        doms = {}
        for name, url in pages.items():
            doms[name] = browse(url, out / f"{name}.png", args.budget_ms, "1600,1000")
            print(f"{name}: {out / f'{name}.png'}  ({url})", flush=True)
        table = doms["runs_table"]
        # the parent is collapsed by default in the runs table: its name shows, children behind the expander
        for r in [parent, *trials[:3], *others]:
            if r.info.run_name not in table and r.info.run_name.replace("=", "=") not in doms.get("chart_view", ""):
                failures.append(f"run name {r.info.run_name!r} not on the runs table / chart view")
        for metric in ("val/objective", "train/loss"):
            if metric not in doms["chart_view"] and metric not in doms.get("best_trial_metrics", ""):
                failures.append(f"metric chart {metric!r} not rendered")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for f in failures:
        print("FAIL:", f)
    print("ok" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

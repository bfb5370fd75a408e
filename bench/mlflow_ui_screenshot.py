"""Open a sweep's MLflow record in the real MLflow UI (headless Chromium) and screenshot it.

Starts ``mlflow ui`` on 127.0.0.1 (a free port) over the SQLite store, loads the experiment's
runs table, its chart view and the best trial's and refit's metric pages in headless Chromium,
writes PNGs to ``--out`` (outside the repository by default) and checks the rendered pages
(:func:`check_pages`): every run name of the sweep (``t00 γ=…``, ``refit best=…``,
``target-eval best=…``) on the runs table and the parent's name on its page; on each run's
metrics page every chart section it must have (a trial ``train``, ``val``, ``lr``; the refit
``train``; the target evaluation ``target/<dataset>``) with at least one chart, and none empty;
on the chart view the ``train``, ``val`` and ``lr`` sections with charts; no "No charts in this
section" on a page where no section holds a chart (sections left empty by MLflow itself are
printed as notes). Exit status 1 when a check fails. The chart view is opened sorted by a metric:
unsorted, MLflow 3.17 folds the trials under their collapsed parent and charts only the parent
(``lr (0)``, ``train (0)``, "No charts in this section"), which is what a user sees there until they
expand the parent row or sort by a metric::

    apt-get install -y chromium        # once
    python bench/mlflow_ui_screenshot.py --tracking-uri sqlite:///$PWD/runs/mlflow.db \\
        --experiment ssvp-quick --out /tmp/mlflow-ui

Look at the PNGs (any image viewer); keep them out of the repository.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

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
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"mlflow ui exited with {proc.returncode}")
            time.sleep(1)
    proc.terminate()
    sys.exit("mlflow ui did not come up in 300 s")


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client): pages get
    real seconds to draw their charts, which ``--screenshot`` / ``--virtual-time-budget`` do not give."""

    def __init__(self, size: tuple[int, int] = (1600, 1000)):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={size[0]},{size[1]}", f"--remote-debugging-port={self.port}",
             "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._id = 0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def visit(self, url: str, png: Path, wait_s: float) -> str:
        """Open ``url``, wait ``wait_s`` seconds, write a screenshot; the page's visible text."""
        import asyncio

        return asyncio.run(self._visit(url, png, wait_s))

    async def _visit(self, url: str, png: Path, wait_s: float) -> str:
        import asyncio
        import base64
        import json

        import aiohttp

        async with aiohttp.ClientSession() as http:
            for _ in range(60):
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/json/list") as resp:
                        pages = [t for t in await resp.json() if t.get("type") == "page"]
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(1)
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                async def call(method: str, **params):
                    self._id += 1
                    await ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
                    while True:
                        msg = json.loads((await ws.receive()).data)
                        if msg.get("id") == self._id:
                            return msg.get("result", {})

                await call("Page.navigate", url=url)
                await asyncio.sleep(wait_s)
                shot = await call("Page.captureScreenshot", format="png")
                png.write_bytes(base64.b64decode(shot["data"]))
                text = await call("Runtime.evaluate", expression="document.body.innerText")
                return text.get("result", {}).get("value", "")


def page_urls(root: str, parent, others) -> dict[str, str]:
    """The pages to open: experiment, runs table (the sweep's children, best first), chart view,
    parent run, and the metrics pages of the best trial, the refit and the target evaluation."""
    ml = "workflowType=machine_learning"
    # the sweep's child runs (the table folds them under the parent otherwise), best first
    children = quote(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    order = quote("metrics.`best_val_objective`")
    pages = {
        # a direct link without workflowType opens the browser's last workspace (GenAI in a fresh one)
        "experiment": root,
        "runs_table": f"{root}/runs?{ml}&searchFilter={children}&orderByKey={order}&orderByAsc=false",
        # sorted by a metric the list is flat: unsorted, the chart view folds the children under
        # their parent, charts only the (collapsed) parent and its sections stay empty ("lr (0)")
        "chart_view": f"{root}/runs?{ml}&searchFilter={children}&orderByKey={order}&orderByAsc=false&compareRunsMode=CHART",
        "parent_run": f"{root}/runs/{parent.info.run_id}?{ml}",
    }
    best = parent.data.tags.get("best_run_id")
    if best:
        pages["best_trial_metrics"] = f"{root}/runs/{best}/model-metrics?{ml}"
    for r in others:
        pages[f"{r.data.tags['role']}_run"] = f"{root}/runs/{r.info.run_id}/model-metrics?{ml}"
    return pages


# chart sections a run's metrics page must show, by page (the UI groups metrics by the part before "/")
SECTIONS = {"best_trial_metrics": ("train", "val", "lr"), "refit_run": ("train",), "target_eval_run": ("target",)}
# the UI's empty states (MLflow 3.17 draws "lr (0)" / "No charts in this section" on an empty chart view)
EMPTY = ("No charts in this section", "No chart data", "No metrics", "No data available", "No runs", "No results")


def expected_sections(pages: dict) -> dict[str, tuple[str, ...]]:
    return {name: SECTIONS[name] for name in pages if name in SECTIONS} | {"chart_view": ("train", "val", "lr")}


def check_pages(doms: dict[str, str], names: dict[str, list[str]], sections: dict[str, tuple[str, ...]]) -> list[str]:
    """What is wrong with the rendered pages (their visible text): a run name missing from a page,
    a chart section missing or showing ``(0)`` charts, an empty state, no per-epoch metric on the
    chart view. Empty list: all there."""
    failures = []
    for page, wanted in names.items():
        failures += [f"run name {n!r} not on the {page} page" for n in wanted if n not in doms.get(page, "")]
    for page, wanted in sections.items():
        text = doms.get(page, "")
        for section in wanted:
            # "val (7)"; a deeper name is its own section ("target/domain_b (9)" for target/domain_b/…)
            counts = [int(c) for c in re.findall(rf"(?:^|\s){re.escape(section)}(?:/\S+)?\s*\((\d+)\)", text)]
            if not counts:
                failures.append(f"no {section!r} chart section on the {page} page")
            elif max(counts) == 0:
                failures.append(f"the {section!r} chart section on the {page} page is empty")
        # an empty state counts where no section holds a chart; otherwise it is one of MLflow's own
        # leftover sections (the default one, emptied when every metric sits in a "prefix/" section)
        if not any(int(c) for c in re.findall(r"\((\d+)\)", text)):
            failures += [f"{page} page shows {e!r}" for e in EMPTY if e.lower() in text.lower()]
    return failures


def empty_sections(text: str) -> list[str]:
    """The chart sections a page shows with ``(0)`` charts (printed as a note, see :func:`check_pages`)."""
    return re.findall(r"(?:^|\n)([^\n()]{1,60}) \(0\)", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'runs' / 'mlflow.db'}")
    p.add_argument("--experiment", default="ssvp-quick")
    p.add_argument("--out", default="/tmp/mlflow-ui", help="folder for the PNGs (not in the repository)")
    p.add_argument("--wait-s", type=float, default=25.0, help="seconds each page gets to load and draw")
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
        pages = page_urls(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}", parent, others)
        doms = {}
        browser = Browser()
        try:
            for name, url in pages.items():
                doms[name] = browser.visit(url, out / f"{name}.png", args.wait_s)
                print(f"{name}: {out / f'{name}.png'}  ({url})", flush=True)
        finally:
            browser.close()
        if client.get_experiment(exp.experiment_id).tags.get("mlflow.experimentKind") != "custom_model_development":
            failures.append("the experiment has no mlflow.experimentKind=custom_model_development tag")
        names = {"runs_table": [r.info.run_name for r in [*trials, *others]], "parent_run": [parent.info.run_name]}
        failures += check_pages(doms, names, expected_sections(pages))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for name, text in doms.items():
        for section in empty_sections(text):
            print(f"note: the {name} page shows MLflow's section {section!r} with no chart")
    for f in failures:
        print("FAIL:", f)
    print("ok" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
